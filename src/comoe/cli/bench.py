"""`comoe bench`: its flags."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from comoe.tools.bench.measure import MIN_STEPS
from comoe.tools.bench.render import load_results, render_all, render_result, write_json
from comoe.tools.bench.run import BenchOptions, run_benchmark
from comoe.tools.bench.sizes import SIZES
from comoe.tools.bench.variants import VARIANTS
from comoe.utils.files import write_text_atomic


def _int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in str(text).split(",") if t.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from err
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _variant_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown variants {bad}; known: {', '.join(VARIANTS)}")
    return names


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``comoe bench``."""
    p = parser
    p.add_argument(
        "--size",
        choices=list(SIZES),
        default="tiny",
        help="model/batch preset: " + "; ".join(f"{k}: {v.description}" for k, v in SIZES.items()),
    )
    p.add_argument(
        "--experts", type=_int_list, help="experts per module; a comma list sweeps (default: the preset's)"
    )
    p.add_argument(
        "--rank", type=_int_list, help="LoRA rank of each expert and of the LoRA baseline; a list sweeps"
    )
    p.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--steps", type=int, default=MIN_STEPS, help=f"timed rounds (default {MIN_STEPS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    p.add_argument("--batch", type=int, help="sequences per step (default: the preset's)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the preset's)")
    p.add_argument("--layers", type=int, help="number of transformer layers (default: the preset's)")
    p.add_argument(
        "--variants", type=_variant_list, help=f"comma list out of {', '.join(VARIANTS)} (default all)"
    )
    p.add_argument(
        "--target-modules", default="q_proj,k_proj,v_proj,o_proj", help="adapted modules (comma list)"
    )
    p.add_argument(
        "--con-path",
        choices=("auto", "dense", "grouped"),
        default="auto",
        help="expert path of the contrastive variants (default auto)",
    )
    p.add_argument("--device", help="cpu or cuda (default: the preset's, cpu when no GPU)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="base model dtype")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default on CPU: the preset's, 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--random-init", action="store_true", help="smollm2: random weights instead of the real model"
    )
    p.add_argument("--no-memory", action="store_true", help="skip the activation-memory measurement")
    p.add_argument("--no-generate", action="store_true", help="skip the generate() throughput measurement")
    p.add_argument(
        "--no-parity", action="store_true", help="skip the naive/grouped vs dense same-function check"
    )
    p.add_argument("--gen-tokens", type=int, default=16, help="new tokens per generate call (default 16)")
    p.add_argument("--gen-batch", type=int, default=4, help="prompts per generate call (default 4)")
    p.add_argument("--gen-rounds", type=int, default=5, help="timed generate rounds (default 5)")
    p.add_argument(
        "--compile-check", action="store_true", help="also check torch.compile on a tiny adapted model"
    )
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend for the check")
    p.add_argument("--compile-paths", default="dense,grouped", help="expert paths the compile check tries")
    p.add_argument("--name", help="name of this run (results file stem; default: the size)")
    p.add_argument("--output-dir", "--out", dest="out", help="directory for <name>.json and <name>.md")
    p.add_argument(
        "--markdown", help="write markdown here: every result in --output-dir when given, else this run"
    )
    p.add_argument("--notes", help="markdown file appended after the target summary (with --markdown)")
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
        write_text_atomic(args.markdown, render_all(results, notes))
        print(f"wrote {args.markdown} from {len(results)} result files")
        return 0
    options = BenchOptions(
        **{f.name: getattr(args, f.name) for f in fields(BenchOptions) if f.name != "command"},
        command=getattr(args, "command_line", "comoe bench"),
    )
    result = run_benchmark(options)
    text = render_result(result)
    print(text)
    if args.out:
        path = write_json(result, args.out)
        write_text_atomic(path.with_suffix(".md"), text)
        print(f"wrote {path}")
    if args.markdown:
        results = load_results(args.out) if args.out else [result]
        write_text_atomic(args.markdown, render_all(results, notes))
        print(f"wrote {args.markdown}")
    return 0
