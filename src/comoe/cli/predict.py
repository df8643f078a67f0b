"""`comoe predict`: a trained adapter's answers to the lines of a JSONL file (labels optional)."""

from __future__ import annotations

import argparse
from pathlib import Path

from comoe.cli.flags import given
from comoe.cli.train import run_config_flags

PREDICT_FIELDS = ("model", "protocol", "eval_batch_size", "max_length")  # what predict may change


def predict_flags() -> list[argparse.ArgumentParser]:
    return run_config_flags(
        only=PREDICT_FIELDS, groups=("prediction settings (default: the run's)", "adapter")
    )


def add_source_argument(parser: argparse.ArgumentParser) -> None:
    """RUN_OR_ADAPTER, as `comoe predict` and `comoe export` take it."""
    parser.add_argument(
        "source",
        metavar="RUN_OR_ADAPTER",
        help="a run directory written by `comoe train`, or an adapter directory (adapter_config.json + "
        "adapter_model.safetensors, e.g. from save_pretrained or Trainer)",
    )


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    add_source_argument(parser)
    parser.add_argument(
        "--input",
        required=True,
        metavar="FILE.jsonl",
        help="the inputs, one JSON object per line: the schema of `comoe train`'s files, labels optional "
        '({"question": ..., "choices": [...]} or {"prompt": ...}; "id" and "task" are kept)',
    )
    parser.add_argument(
        "--output-dir", required=True, metavar="DIR", help="where predictions.jsonl and its summary go"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="longest generated answer, in tokens (default: 32)"
    )
    parser.add_argument(
        "--score-answers",
        action="store_true",
        help="judge each prediction against the line's answer or target where it has one (default: ignore them)",
    )
    parser.add_argument(
        "--routing",
        action="store_true",
        help="add each input's routing: per routed layer, how many of its prompt tokens each expert took",
    )


def run_predict(args: argparse.Namespace) -> int:
    from comoe.training.predict import PREDICTIONS_NAME, predict_job
    from comoe.training.run_settings import resolve_run

    overrides = given(args, PREDICT_FIELDS)
    resolve_run(("command line", overrides))  # the flags' own errors name the command line
    out_dir = Path(args.output_dir)
    summary = predict_job(
        Path(args.source),
        Path(args.input),
        out_dir,
        overrides,
        max_new_tokens=args.max_new_tokens,
        score_answers=args.score_answers,
        routing=args.routing,
    )
    print(f"{summary['n']} predictions ({summary['source']}) written to {out_dir / PREDICTIONS_NAME}")
    for task, scored in summary.get("scored", {}).items():
        print(f"  {task}: {scored['correct']}/{scored['n']} correct ({100 * scored['accuracy']:.1f}%)")
    return 0
