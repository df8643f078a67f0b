"""`comoe analyze`: run directories, the output directory, and one flag per AnalyzeOptions field."""

from __future__ import annotations

import argparse

from comoe.analysis import AnalyzeOptions, analyze
from comoe.cli.flags import field_flags, settings_from


def analyze_flags() -> list[argparse.ArgumentParser]:
    return [field_flags(AnalyzeOptions, group="analysis")]


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """The positional run directories and the flags that are not analysis settings."""
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="directories written by `comoe train` (e.g. CoMoE and the same run with λ = 0)",
    )
    parser.add_argument("--config", help="YAML file of analysis settings (the flags below override it)")
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="out",
        help="output directory (default: RUN_DIR/analysis for one run, analysis-compare-<time> for several)",
    )


def run_analyze(args: argparse.Namespace) -> int:
    """Entry point of `comoe analyze`; returns the exit status."""
    analyze(args.run_dirs, args.out, settings_from(AnalyzeOptions, args))
    return 0
