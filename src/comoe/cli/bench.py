"""`comoe bench`: its flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from comoe.cli.flags import field_flags, settings_from
from comoe.tools.bench.render import render_all
from comoe.tools.bench.results_files import load_peer_results, load_results, write_json
from comoe.tools.bench.run import BenchOptions, run_benchmark
from comoe.tools.bench.run_page import render_result
from comoe.utils.files import write_text_atomic


def bench_flags() -> list[argparse.ArgumentParser]:
    return [field_flags(BenchOptions, exclude=("command",), group="measurement")]


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``comoe bench`` that are not measurement settings: the config file and the outputs."""
    p = parser
    p.add_argument("--config", help="YAML file of measurement settings (the flags override it)")
    p.add_argument("--output-dir", "--out", dest="out", help="directory for <name>.json and <name>.md")
    p.add_argument(
        "--markdown", help="write markdown here: every result in --output-dir when given, else this run"
    )
    p.add_argument(
        "--notes",
        help="hand-written markdown (with --markdown): the part before a line <!-- targets --> goes above the "
        "target list, the rest after it",
    )
    p.add_argument(
        "--render", action="store_true", help="run nothing: render the results in --output-dir to --markdown"
    )
    return parser


def run_bench(args: argparse.Namespace) -> int:
    """What ``comoe bench`` does with parsed ``args``; returns the exit status."""
    notes = Path(args.notes).read_text() if args.notes else None
    if args.render:
        if not args.out or not args.markdown:
            raise ValueError("--render needs --output-dir DIR (the results) and --markdown PATH")
        results = load_results(args.out)
        if not results:
            raise FileNotFoundError(f"no benchmark results (*.json) in {args.out}")
        peers = load_peer_results(args.out)
        write_text_atomic(args.markdown, render_all(results, notes, peers))
        print(f"wrote {args.markdown} from {len(results)} result files and {len(peers)} peer results")
        return 0
    options = settings_from(BenchOptions, args, command=getattr(args, "command_line", "comoe bench"))
    if args.out:  # each finished case is written at once: a sweep stopped by a time limit keeps them

        def on_case(partial: dict) -> None:
            write_json(partial, args.out)

    result = run_benchmark(options, on_case=on_case if args.out else None)
    text = render_result(result)
    print(text)
    if args.out:
        path = write_json(result, args.out)
        write_text_atomic(path.with_suffix(".md"), text)
        print(f"wrote {path}")
    if args.markdown:
        results = load_results(args.out) if args.out else [result]
        peers = load_peer_results(args.out) if args.out else []
        write_text_atomic(args.markdown, render_all(results, notes, peers))
        print(f"wrote {args.markdown}")
    return 0
