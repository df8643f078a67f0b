"""`comoe export`: a trained adapter and its base model as one Hugging Face model folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from comoe.cli.flags import given
from comoe.cli.predict import add_source_argument
from comoe.cli.train import run_config_flags

EXPORT_FIELDS = ("model",)  # what export may change: the base of a bare adapter directory


def export_flags() -> list[argparse.ArgumentParser]:
    return run_config_flags(only=EXPORT_FIELDS, groups=("export settings (default: the run's)", "adapter"))


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_argument(parser)
    parser.add_argument(
        "--output-dir",
        required=True,
        metavar="DIR",
        help="the model folder to write (must not exist, or be empty)",
    )
    parser.add_argument(
        "--task",
        metavar="TASK",
        help="the task whose adapter to export, for a single-task run that trained one adapter per task",
    )


def run_export(args: argparse.Namespace) -> int:
    from comoe.training.export import export_job
    from comoe.training.run_settings import resolve_run

    overrides = given(args, EXPORT_FIELDS)
    resolve_run(("command line", overrides))  # the flags' own errors name the command line
    out_dir = Path(args.output_dir)
    summary = export_job(Path(args.source), out_dir, overrides, task=args.task)
    print(
        f"exported {summary['source']} ({summary['architecture']}, {summary['layers']} adapted modules: "
        f"{', '.join(summary['kinds'])} experts) to {out_dir}"
    )
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True)")
    return 0
