"""`comoe` command line: train, eval, tasks (analyze, bench and compare build on these)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from comoe.runconfig import RunConfig, add_run_config_flags, given_fields, load_yaml, run_config_from_args
from comoe.validation import did_you_mean


def _train(args: argparse.Namespace) -> int:
    from comoe.job import resumed_run, run_job

    if args.resume:
        run_dir = Path(args.resume)
        run_job(resumed_run(run_dir, _requested_fields(args)), run_dir, resume=True)
        return 0
    run_job(run_config_from_args(args))
    return 0


def _requested_fields(args: argparse.Namespace) -> dict:
    """The RunConfig fields that the --config file and the flags set (the flags win)."""
    requested = {}
    if args.config:
        data = load_yaml(args.config) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{args.config}: expected a mapping of RunConfig fields, got {type(data).__name__}")
        known = {f.name for f in fields(RunConfig)}
        unknown = sorted(map(str, set(data) - known))
        if unknown:
            raise ValueError(f"{args.config}: unknown fields {unknown}{did_you_mean(unknown, known)}; "
                             f"known fields: {sorted(known)}")
        requested.update(data)
    requested.update(given_fields(args))  # a flag given as `none` counts too
    return requested


def _eval(args: argparse.Namespace) -> int:
    from comoe.job import eval_job

    if args.run_dir is None and not args.base_only:
        raise ValueError("give a RUN_DIR (a directory written by `comoe train`), or --base-only to score the base model")
    overrides = {k: getattr(args, k) for k in ("tasks", "test_per_task", "protocol", "model", "eval_batch_size")
                 if getattr(args, k) is not None}
    eval_job(Path(args.run_dir) if args.run_dir else None, base_only=args.base_only, overrides=overrides)
    return 0


def _tasks(args: argparse.Namespace) -> int:
    from comoe.data.registry import list_tasks

    for line in list_tasks():
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="comoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="fine-tune with CoMoE (or a baseline) and evaluate per task",
                           description="Every flag overrides the YAML file of --config, which overrides the defaults.")
    train.add_argument("--config", help="YAML file of RunConfig fields")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    add_run_config_flags(train)
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval", help="score a run's adapter, or the base model, on the test sets")
    ev.add_argument("run_dir", nargs="?", help="a directory written by `comoe train`")
    ev.add_argument("--base-only", action="store_true", help="score the zero-shot base model")
    ev.add_argument("--tasks", type=lambda s: [t for t in s.split(",") if t])
    ev.add_argument("--test-per-task", type=int)
    ev.add_argument("--protocol", choices=("label", "loglik"))
    ev.add_argument("--model")
    ev.add_argument("--eval-batch-size", type=int)
    ev.set_defaults(func=_eval)

    analyze = sub.add_parser("analyze", help="expert specialisation report for one or more run directories")
    from comoe.analysis import add_analyze_arguments, run_analyze

    add_analyze_arguments(analyze)
    analyze.set_defaults(func=run_analyze)

    bench = sub.add_parser("bench", help="speed and memory vs PEFT LoRA and a naive MoE-LoRA loop (ratios in one process)")
    from comoe.bench import add_bench_arguments, run_bench

    add_bench_arguments(bench)
    bench.set_defaults(func=run_bench)

    compare = sub.add_parser("compare", help="a resumable grid of methods × seeds × settings, with statistics")
    from comoe.compare import add_compare_arguments, run_compare

    add_compare_arguments(compare)
    compare.set_defaults(func=run_compare)

    tasks = sub.add_parser("tasks", help="list the built-in and supported tasks")
    tasks.set_defaults(func=_tasks)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Bad input (a ValueError, a file or network OSError, a missing package, a diverged
    run) is reported as one message and exit status 2, without a traceback (``COMOE_DEBUG=1`` shows it)."""
    from comoe.train import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError, ImportError, TrainingDiverged) as err:
        if os.environ.get("COMOE_DEBUG"):
            raise
        print(f"comoe {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (`comoe train --resume RUN_DIR` continues from the last checkpoint)" if args.command == "train" else ""
        print(f"comoe {args.command}: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
