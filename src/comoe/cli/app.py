"""`comoe` command line: train, eval, predict, export, tasks (analyze, bench and compare build on these)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from comoe.cli.flags import ArgumentParser
from comoe.cli.train import EVAL_FIELDS, run_config_flags, run_eval, run_train


def _tasks(args: argparse.Namespace) -> int:
    from comoe.data.registry import list_tasks

    for line in list_tasks():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="comoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train",
        help="fine-tune with CoMoE (or a baseline) and evaluate per task",
        description="Fine-tune an adapter and evaluate it per task. Every flag overrides the YAML file of "
        "--config, which overrides the defaults; a flag may be written --max-steps or --max_steps.",
        parents=run_config_flags(),
    )
    train.add_argument("--config", help="YAML file of RunConfig fields")
    train.add_argument(
        "--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint"
    )
    train.set_defaults(func=run_train)

    ev = sub.add_parser(
        "eval",
        help="score a run's adapter, or the base model, on the test sets",
        description="Score a run's adapter (or, with --base-only, the zero-shot base model) on the test sets. "
        "The flags change the run's own settings for this evaluation.",
        parents=run_config_flags(only=EVAL_FIELDS),
    )
    ev.add_argument("run_dir", nargs="?", help="a directory written by `comoe train`")
    ev.add_argument("--base-only", action="store_true", help="score the zero-shot base model")
    ev.set_defaults(func=run_eval)

    from comoe.cli.predict import add_predict_arguments, predict_flags, run_predict

    predict = sub.add_parser(
        "predict",
        help="apply a trained adapter to your own inputs (a JSONL file, labels optional)",
        description="Answer each line of a JSONL file with a trained adapter: for multiple choice the chosen "
        "option and every option's score, for generation the generated text; one output line per input "
        "line, in order. The flags change the run's own settings for these predictions.",
        parents=predict_flags(),
    )
    add_predict_arguments(predict)
    predict.set_defaults(func=run_predict)

    from comoe.cli.export import add_export_arguments, export_flags, run_export

    export = sub.add_parser(
        "export",
        help="a trained adapter and its base model as one Hugging Face model folder (trust_remote_code)",
        description="Write a self-contained model folder: the base model's config and weights with the "
        "adapter's, the tokenizer, and inference code registered through auto_map, so that "
        "AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) loads it without comoe.",
        parents=export_flags(),
    )
    add_export_arguments(export)
    export.set_defaults(func=run_export)

    from comoe.cli.analyze import add_analyze_arguments, analyze_flags, run_analyze

    analyze = sub.add_parser(
        "analyze",
        help="expert specialisation report for one or more run directories",
        description="Route each run's test sets through its adapter and report whether the experts "
        "specialise. Every flag overrides the YAML file of --config, which overrides the defaults.",
        parents=analyze_flags(),
    )
    add_analyze_arguments(analyze)
    analyze.set_defaults(func=run_analyze)

    from comoe.cli.bench import add_bench_arguments, bench_flags, run_bench

    bench = sub.add_parser(
        "bench",
        help="speed and memory vs PEFT LoRA and a naive MoE-LoRA loop (ratios in one process)",
        description="Measure comoe's step time, memory and generation speed as ratios to PEFT LoRA and a "
        "naive MoE-LoRA loop, alternating the variants in one process. Every flag overrides the YAML file "
        "of --config, which overrides the defaults.",
        parents=bench_flags(),
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

    from comoe.cli.compare import add_compare_arguments, compare_flags, run_compare

    compare = sub.add_parser(
        "compare",
        help="a resumable grid of methods × seeds × settings, with statistics",
        description="Train every cell of a grid (variants × seeds × settings) as its own `comoe train` run, "
        "resumably, and summarise it. The grid comes from --config (or --preset); the grid flags override "
        "its seeds, settings and reference, and every run flag (e.g. --max-steps 10) its base.",
        parents=compare_flags(),
    )
    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare)

    tasks = sub.add_parser("tasks", help="list the built-in and supported tasks")
    tasks.set_defaults(func=_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a ValueError, a file or network OSError, a missing package, a diverged
    run) is reported as one message and exit status 2, without a traceback (``COMOE_DEBUG=1`` shows it)."""
    from comoe.training.loop import TrainingDiverged

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.command_line = "comoe " + shlex.join(argv)  # recorded by bench and compare
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, TrainingDiverged) as err:
        if os.environ.get("COMOE_DEBUG"):
            raise
        print(f"comoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (
            " (`comoe train --resume RUN_DIR` continues from the last checkpoint)"
            if args.command == "train"
            else ""
        )
        print(f"comoe {args.command}: interrupted{hint}", file=sys.stderr)
        return 130
