"""`comoe compare`: its flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from comoe.experiments.compare import compare
from comoe.experiments.grid import PRESETS, REFERENCE, Grid, load_grid
from comoe.training.run_config import parse_field_value


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--grid",
        help="YAML: variants (name → RunConfig overrides) or preset, seeds, settings, base, reference",
    )
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a ready-made grid (default: lora / moe-lora / comoe)"
    )
    parser.add_argument(
        "--reference",
        type=lambda s: s.split(","),
        help="variant(s) to take paired differences against, e.g. moe-lora,lora (default: the preset's)",
    )
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="e.g. 0,1,2")
    parser.add_argument("--settings", type=lambda s: s.split(","), help="multi, single or multi,single")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a RunConfig field for every run (repeatable), e.g. --set train_per_task=64",
    )
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="out",
        default="results/compare",
        help="grid directory (runs/, summary.json, summary.md)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at once, each with cores/jobs torch threads and its output in RUN_DIR/train.log",
    )
    parser.add_argument("--summary-only", action="store_true", help="summarise finished runs, start none")
    parser.add_argument(
        "--no-analysis",
        action="store_true",
        help="skip the specialisation numbers (a `comoe analyze` pass per routed run, ~40 s each on CPU)",
    )


def run_compare(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")

    grid = (
        load_grid(args.grid)
        if args.grid
        else Grid(
            variants=PRESETS[args.preset or "default"], reference=REFERENCE.get(args.preset or "default")
        )
    )
    if args.grid and args.preset:
        raise ValueError("give --grid or --preset, not both")
    if args.seeds:
        grid.seeds = args.seeds
    if args.reference:
        grid.reference = args.reference
    if args.settings:
        grid.settings = args.settings
    for item in args.set:
        name, _, value = item.partition("=")
        grid.base[name] = parse_field_value(name, value)
    command = getattr(args, "command_line", "comoe compare")
    compare(
        grid,
        Path(args.out),
        command,
        summary_only=args.summary_only,
        analyse=not args.no_analysis,
        jobs=args.jobs,
    )
    return 0
