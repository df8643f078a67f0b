"""`comoe analyze`: its flags."""

from __future__ import annotations

import argparse

from comoe.analysis import AnalyzeOptions, analyze


def add_analyze_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `comoe analyze`."""
    defaults = AnalyzeOptions()
    parser.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="directories written by `comoe train` (e.g. CoMoE and the same run with λ = 0)",
    )
    parser.add_argument(
        "--output-dir",
        "--out",
        dest="out",
        help="output directory (default: RUN_DIR/analysis for one run, analysis-compare-<time> for several)",
    )
    parser.add_argument(
        "--test-per-task",
        type=_optional_int,
        default=defaults.test_per_task,
        help=f"test examples per task, 'none' for all (default: {defaults.test_per_task})",
    )
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument(
        "--max-length", type=int, default=None, help="token limit per example (default: the run's)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=defaults.samples,
        help=f"tokens per module whose expert outputs are kept for redundancy (default: {defaults.samples})",
    )
    parser.add_argument(
        "--projection-samples",
        type=int,
        default=defaults.projection_samples,
        help=f"tokens kept for the 2-D projection (default: {defaults.projection_samples})",
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="layer of the 2-D projection (default: the middle one)"
    )
    parser.add_argument(
        "--module", default=defaults.module, help=f"module of the 2-D projection (default: {defaults.module})"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's, or 1 when the machine is already busy)",
    )
    parser.add_argument(
        "--no-tsne", action="store_true", help="skip t-SNE even when scikit-learn is installed"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _optional_int(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def run_analyze(args: argparse.Namespace) -> int:
    """Entry point of `comoe analyze`; returns the exit status."""
    options = AnalyzeOptions(
        test_per_task=args.test_per_task,
        batch_size=args.batch_size,
        max_length=args.max_length,
        samples=args.samples,
        projection_samples=args.projection_samples,
        layer=args.layer,
        module=args.module,
        seed=args.seed,
        progress=not args.no_progress,
        tsne=not args.no_tsne,
        threads=args.threads,
    )
    for name in ("batch_size", "samples", "projection_samples", "threads"):
        if getattr(options, name) is not None and getattr(options, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    analyze(args.run_dirs, args.out, options)
    return 0
