"""`comoe bench` as a function: ``BenchOptions`` (what one run measures) and ``run_benchmark`` (the sweep
over (E, r) cases, the compile check, the judged targets)."""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch

from comoe.config import EXPERT_PATHS
from comoe.tools.bench.case import run_case
from comoe.tools.bench.compile_check import compile_check
from comoe.tools.bench.measure import MIN_STEPS, make_batch
from comoe.tools.bench.sizes import SIZES, build_base
from comoe.tools.bench.thresholds import evaluate_targets
from comoe.tools.bench.variants import VARIANTS
from comoe.utils.machine import machine_info
from comoe.utils.validation import check_field_types, doc

SCHEMA_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchOptions:
    """What one `comoe bench` run measures; each field is a flag (and a key of its ``--config`` file).

    ``none`` takes the size preset's value.
    """

    size: str = field(
        default="tiny",
        metadata=doc(
            "Model and batch preset: " + "; ".join(f"{k}: {v.description}" for k, v in SIZES.items()) + ".",
            SIZES,
        ),
    )
    experts: list[int] | None = field(
        default=None, metadata=doc("Experts per module; a comma list sweeps. none = the preset's.")
    )
    rank: list[int] | None = field(
        default=None,
        metadata=doc(
            "LoRA rank of each expert and of the LoRA baseline; a comma list sweeps. none = the preset's."
        ),
    )
    top_k: int = field(default=2, metadata=doc("Experts per token."))
    steps: int = field(default=MIN_STEPS, metadata=doc("Timed rounds."))
    warmup: int = field(default=2, metadata=doc("Untimed rounds first."))
    batch: int | None = field(default=None, metadata=doc("Sequences per step; none = the preset's."))
    seq: int | None = field(default=None, metadata=doc("Tokens per sequence; none = the preset's."))
    layers: int | None = field(default=None, metadata=doc("Transformer layers; none = the preset's."))
    variants: list[str] | None = field(
        default=None, metadata=doc(f"A comma list out of {', '.join(VARIANTS)}; none = the preset's.")
    )
    target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata=doc("Adapted modules (comma list).")
    )
    con_path: str = field(
        default="auto", metadata=doc("Expert path of the contrastive variants.", EXPERT_PATHS)
    )
    device: str | None = field(
        default=None, metadata=doc("cpu or cuda; none = the preset's (cpu without a GPU).")
    )
    dtype: str | None = field(default=None, metadata=doc("Base model dtype; none = the preset's.", DTYPES))
    autocast: str | None = field(
        default=None,
        metadata=doc(
            "Run each forward under torch.autocast in this dtype (mixed precision, as `comoe train --bf16`); "
            "none = no autocast.",
            DTYPES[1:],
        ),
    )
    threads: int | None = field(
        default=None, metadata=doc("torch.set_num_threads; none = the preset's on CPU (1).")
    )
    seed: int = field(default=0, metadata=doc("Seeds the weights and batches."))
    random_init: bool = field(
        default=False, metadata=doc("smollm2 sizes: random weights instead of the real model.")
    )
    no_memory: bool = field(default=False, metadata=doc("Skip the activation-memory measurement."))
    no_generate: bool = field(default=False, metadata=doc("Skip the generate() throughput measurement."))
    no_parity: bool = field(
        default=False, metadata=doc("Skip the naive/grouped vs dense same-function check.")
    )
    gen_tokens: int = field(default=16, metadata=doc("New tokens per generate call."))
    gen_batch: int = field(default=4, metadata=doc("Prompts per generate call."))
    gen_rounds: int = field(default=5, metadata=doc("Timed generate rounds."))
    compile: bool = field(
        default=False,
        metadata=doc(
            "Compile every variant's decoder layers (comoe.compile_layers, as `comoe train --compile`) "
            "and time the compiled steps; generate with a static KV cache (transformers compiles its decode "
            "step on a GPU). Memory and parity are then skipped."
        ),
    )
    compile_check: bool = field(
        default=False, metadata=doc("Also check torch.compile on a tiny adapted model.")
    )
    compile_backend: str = field(default="inductor", metadata=doc("torch.compile backend of the check."))
    compile_paths: str = field(default="dense,grouped", metadata=doc("Expert paths the compile check tries."))
    name: str | None = field(
        default=None, metadata=doc("Name of this run (results file stem); none = the size.")
    )
    command: str = field(default="comoe bench", metadata=doc("The command line, recorded in the result."))

    def __post_init__(self) -> None:
        check_field_types(self)
        for name, allowed in (
            ("size", SIZES),
            ("con_path", EXPERT_PATHS),
            ("dtype", DTYPES),
            ("autocast", DTYPES[1:]),
        ):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        unknown = [v for v in self.variants or [] if v not in VARIANTS]
        if unknown:
            raise ValueError(f"variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
        for name in ("experts", "rank"):
            values = getattr(self, name)
            if values is not None and (not values or min(values) < 1):
                raise ValueError(f"{name} must be positive integers, got {values!r}")
        for name in (
            "top_k",
            "steps",
            "batch",
            "seq",
            "layers",
            "threads",
            "gen_tokens",
            "gen_batch",
            "gen_rounds",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def run_benchmark(
    args: BenchOptions,
    log: Callable[[str], None] = print,
    on_case: Callable[[dict], None] | None = None,
) -> dict:
    """Run the benchmark ``args`` describes; returns the result dict (also what is written as JSON).

    ``on_case`` gets the result so far after each finished case except the last, marked ``partial`` (the
    CLI writes it, so that a sweep stopped by a time limit keeps the cases it finished)."""
    threads_before = torch.get_num_threads()
    try:
        return _run_benchmark(args, log, on_case)
    finally:
        torch.set_num_threads(threads_before)


def _finish(result: dict, t_start: float, cpu_start: float) -> dict:
    """Elapsed wall and CPU time (this process's: what an idle machine needs) and the judged targets."""
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    result["cpu_s"] = round(time.process_time() - cpu_start, 1)
    result["targets"] = evaluate_targets(result)
    return result


def _run_benchmark(
    args: BenchOptions, log: Callable[[str], None], on_case: Callable[[dict], None] | None
) -> dict:
    t_start, cpu_start = time.perf_counter(), time.process_time()
    spec = SIZES[args.size]
    for field_name in ("layers", "batch", "seq"):
        if getattr(args, field_name, None):
            spec = replace(spec, **{field_name: getattr(args, field_name)})
    if spec.device == "cuda" and not args.device and not torch.cuda.is_available():
        raise ValueError(
            f"--size {args.size} is a CUDA preset and no GPU is visible; pass --device cpu to force it"
        )
    device = torch.device(args.device or spec.device)
    dtype = getattr(torch, args.dtype or (spec.dtype if device.type == "cuda" else "float32"))
    threads = args.threads or (spec.threads if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    experts = args.experts or list(spec.experts)
    ranks = args.rank or list(spec.ranks)
    variants = args.variants or list(spec.variants)
    targets = [t for t in args.target_modules.split(",") if t]
    if args.steps < MIN_STEPS:
        log(f"note: --steps {args.steps} < {MIN_STEPS}: fine for a smoke test, too few for committed numbers")
    log(f"comoe bench: size={args.size} device={device} dtype={dtype} batch={spec.batch}x{spec.seq}")
    base, weights = build_base(spec, device, dtype, args.seed, args.random_init)
    base.train()
    autocast = getattr(torch, args.autocast) if args.autocast else None
    batch = make_batch(base, spec, spec.batch, spec.seq, device, args.seed, autocast)
    result: dict = {
        "schema": SCHEMA_VERSION,
        "name": args.name or args.size,
        "size": args.size,
        "command": args.command,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(device),
        "spec": asdict(spec),
        "weights": weights,
        "settings": {
            "device": device.type,
            "dtype": str(dtype).replace("torch.", ""),
            "autocast": args.autocast,
            "compiled": args.compile,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": spec.batch,
            "seq": spec.seq,
            "tokens_per_step": batch.tokens,
            "threads": torch.get_num_threads(),
            "top_k": args.top_k,
            "target_modules": targets,
            "con_path": args.con_path,
            "seed": args.seed,
            "variants": variants,
            "lora_dropout": 0.05,
            "lora_alpha": "2r",
            "optimizer": "AdamW (adapters)",
        },
        "cases": [],
        "checks": {},
    }
    points = [(rank, n_exp) for rank in ranks for n_exp in experts]
    for n_exp in sorted({e for _, e in points if args.top_k >= e}):
        log(f"  skip E={n_exp}: top_k={args.top_k} needs E > k")
    points = [(rank, n_exp) for rank, n_exp in points if args.top_k < n_exp]
    for done, (rank, n_exp) in enumerate(points, start=1):
        result["cases"].append(
            run_case(
                base,
                spec,
                variants=variants,
                experts=n_exp,
                rank=rank,
                top_k=args.top_k,
                targets=targets,
                con_path=args.con_path,
                batch=batch,
                steps=args.steps,
                warmup=args.warmup,
                device=device,
                seed=args.seed,
                memory=not (args.no_memory or args.compile),
                generate=(not args.no_generate) and done == 1,
                gen_tokens=args.gen_tokens,
                gen_batch=args.gen_batch,
                gen_rounds=args.gen_rounds,
                parity=done == 1 and not (args.no_parity or args.compile),
                compile=args.compile,
                log=log,
            )
        )
        if on_case is not None and done < len(points):
            on_case(_finish({**result, "partial": f"{done} of {len(points)} cases"}, t_start, cpu_start))
    if args.compile_check:
        log(f"  torch.compile check (backend {args.compile_backend})")
        result["checks"]["compile"] = compile_check(
            args.compile_backend,
            paths=tuple(args.compile_paths.split(",")),
            seed=args.seed,
            steps=args.steps,
            warmup=args.warmup,
            log=log,
        )
    return _finish(result, t_start, cpu_start)
