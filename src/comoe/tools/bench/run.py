"""One case (an (E, r) point, every variant round-robin), the targets, and the whole run."""

from __future__ import annotations

import datetime as _dt
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from comoe.config import EXPERT_PATHS
from comoe.tools.bench.compile_check import _first_line, compile_check
from comoe.tools.bench.measure import (
    MIN_STEPS,
    Batch,
    generate_fn,
    host_syncs_per_step,
    make_batch,
    median,
    paired_ratio,
    parity_check,
    peak_step_bytes,
    saved_activation_bytes,
    time_round_robin,
    train_step,
)
from comoe.tools.bench.sizes import SIZES, SizeSpec, build_base
from comoe.tools.bench.variants import GENERATE_VARIANTS, VARIANTS, Variant, auto_path, build_variant
from comoe.utils.machine import machine_info
from comoe.utils.validation import check_field_types, doc

SCHEMA_VERSION = 1
DTYPES = ("float32", "bfloat16", "float16")


# Targets: thresholds and where each is judged. Each measured figure is judged against one threshold.
TARGET_NAIVE = 0.5  # ours / naive step time, tiny model, CPU
TARGET_LORA = 1.3  # ours / LoRA step time, CPU, hidden >= 1024
TARGET_GPU_LORA = 1.05  # ours / LoRA step time on a GPU (LLaMA-2-7B-shaped layers)
TARGET_MEM = 1.3  # ours / LoRA activation memory (saved tensors; peak allocated on a GPU)
TARGET_MEM_CON = 1.2  # ours + contrastive / LoRA activation memory (saved tensors), every size
TARGET_CON = 0.05  # extra step time of the contrastive loss, SmolLM2 shape and hidden >= 1024
TARGET_CON_TINY = 0.15  # the same at the tiny shape
TARGET_GEN = 0.9  # ours / LoRA generate tokens/s (at least), SmolLM2 shape
WIDE_HIDDEN = 1024


# --- one case: one (E, r) point, all variants round-robin ---------------------------------------------
def run_case(
    base: nn.Module,
    spec: SizeSpec,
    *,
    variants: list[str],
    experts: int,
    rank: int,
    top_k: int,
    targets: list[str],
    con_path: str,
    batch: Batch,
    steps: int,
    warmup: int,
    device: torch.device,
    seed: int,
    memory: bool,
    generate: bool,
    gen_tokens: int,
    gen_batch: int,
    gen_rounds: int,
    parity: bool,
    log: Callable[[str], None],
) -> dict:
    """Build every variant for one (E, r), time them round-robin, then measure memory and generation."""
    built: dict[str, Variant] = {}
    case: dict = {
        "experts": experts,
        "rank": rank,
        "top_k": top_k,
        "auto_path": auto_path(base, experts, rank, top_k, targets, batch.autocast),
    }
    for name in variants:
        try:
            built[name] = build_variant(
                name,
                base,
                experts=experts,
                rank=rank,
                top_k=top_k,
                targets=targets,
                con_path=con_path,
                seed=seed,
            )
        except (ValueError, torch.OutOfMemoryError) as err:
            case.setdefault("skipped", {})[name] = f"{type(err).__name__}: {err}"[:300]
    for name in list(
        built
    ):  # one step each first: a variant that fails (memory, kernel) is dropped, not the case
        try:
            torch.manual_seed(seed)
            train_step(built[name], batch)
        except (
            torch.OutOfMemoryError,
            RuntimeError,
        ) as err:  # e.g. a kernel without this dtype on this device
            case.setdefault("skipped", {})[name] = f"{type(err).__name__}: {_first_line(err)[:200]}"
            del built[name]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    log(f"  E={experts} r={rank}: timing {', '.join(built)} ({warmup} warm-up + {steps} rounds)")
    fns = {n: (lambda v=v: train_step(v, batch)) for n, v in built.items()}
    try:
        times = time_round_robin(fns, steps, warmup, device, seed)
    except torch.OutOfMemoryError as err:  # GPU sweeps: report instead of dying
        case["error"] = f"OutOfMemoryError: {str(err)[:200]}"
        return case
    rows: dict[str, dict] = {}
    for name, ts in times.items():
        v = built[name]
        half = len(ts) // 2
        rows[name] = {
            "path": v.paths,
            "trainable_params": v.trainable,
            "median_ms": 1e3 * median(ts),
            "iqr_ms": 1e3 * (statistics.quantiles(ts, n=4)[2] - statistics.quantiles(ts, n=4)[0])
            if len(ts) >= 4
            else None,
            "tokens_per_s": batch.tokens / median(ts),
            "drift": median(ts[half:]) / median(ts[:half]) if half else None,
            "times_ms": [round(1e3 * t, 3) for t in ts],
        }
    for ref in ("base", "lora", "naive"):
        if ref in times:
            for name in times:
                rows[name][f"x_{ref}"] = paired_ratio(times[name], times[ref])
    for name in times:  # contrastive overhead against our variant on the same path
        if name.startswith("ours-con"):
            same = {"dense": "ours-dense", "grouped": "ours-grouped"}.get(built[name].paths)
            if same in times:
                rows[name]["x_ours_same_path"] = paired_ratio(times[name], times[same])
    if memory:
        log("  memory")
        for name, v in built.items():
            torch.manual_seed(seed)
            saved, count = saved_activation_bytes(v, batch)
            rows[name].update(
                saved_bytes=saved,
                saved_tensors=count,
                peak_bytes=peak_step_bytes(v, batch, device),
                host_syncs=host_syncs_per_step(v, batch, device),
            )
        if "lora" in rows:
            for name in rows:
                rows[name]["mem_x_lora"] = rows[name]["saved_bytes"] / max(1, rows["lora"]["saved_bytes"])
                if rows[name].get("peak_bytes") is not None:
                    rows[name]["peak_x_lora"] = rows[name]["peak_bytes"] / max(1, rows["lora"]["peak_bytes"])
    case["variants"] = rows
    if generate:
        gen_variants = [n for n in GENERATE_VARIANTS if n in built]
        if gen_variants:
            log(f"  generate: {', '.join(gen_variants)}")
            for n in gen_variants:
                built[n].model.eval()
            gen = torch.Generator().manual_seed(seed + 7)
            vocab = base.get_input_embeddings().weight.shape[0]
            prompt = torch.randint(3, vocab, (gen_batch, 16), generator=gen).to(device)
            gtimes = time_round_robin(
                {n: generate_fn(built[n], prompt, gen_tokens, batch.autocast) for n in gen_variants},
                gen_rounds,
                1,
                device,
                seed,
            )
            for n in gen_variants:
                built[n].model.train()
            grow = {
                n: {"median_ms": 1e3 * median(t), "tokens_per_s": gen_batch * gen_tokens / median(t)}
                for n, t in gtimes.items()
            }
            for ref in ("base", "lora"):
                if ref in gtimes:
                    for n in grow:  # tokens/s ratio = inverse time ratio
                        grow[n][f"tps_x_{ref}"] = paired_ratio(gtimes[ref], gtimes[n])
            case["generate"] = {
                "new_tokens": gen_tokens,
                "batch": gen_batch,
                "prompt_len": 16,
                "rounds": gen_rounds,
                "variants": grow,
            }
    if parity:
        case["parity"] = parity_check(built, batch, seed)
    del built, fns
    gc.collect()
    return case


# --- targets ---------------------------------------------------------------------------------------------
def _target(
    name: str,
    where: str,
    value: float | None,
    threshold: float,
    met: bool | None,
    note: str = "",
    unit: str = "x",
    at_least: bool = False,
) -> dict:
    """One judged target; ``unit`` "x" (a ratio) or "%" (an overhead), ``at_least`` for a lower bound."""
    return {
        "target": name,
        "where": where,
        "value": value,
        "threshold": threshold,
        "met": met,
        "note": note,
        "unit": unit,
        "at_least": at_least,
    }


def evaluate_targets(result: dict) -> list[dict]:
    """The targets this run can judge, each measured figure once: step time against the naive loop (tiny,
    CPU) and against PEFT LoRA (hidden ≥ 1024, CPU and GPU), the contrastive term's step overhead (≤ 15 %
    tiny, ≤ 5 % at the SmolLM2 shape and hidden ≥ 1024), activation memory (ours ≤ 1.3× LoRA, with the
    contrastive term ≤ 1.2×; peak allocated ≤ 1.3× on a GPU), generation (≥ 0.9× LoRA's tokens/s at the
    SmolLM2 shape), and the torch.compile check."""
    spec, device = result["spec"], result["settings"]["device"]
    wide = spec["hidden"] >= WIDE_HIDDEN
    tiny = result["size"] == "tiny"
    out = []
    for case in result["cases"]:
        rows = case.get("variants", {})
        where = f"{result['name']}, E={case['experts']}, r={case['rank']}"
        ours = {"dense": "ours-dense", "grouped": "ours-grouped"}.get(case["auto_path"])
        if "naive" in rows and tiny and device == "cpu":
            for name in ("ours-dense", "ours-grouped"):
                if name in rows:
                    v = rows[name]["x_naive"]
                    label = f"{where} ({name}{', the auto path' if name == ours else ''})"
                    out.append(
                        _target(
                            "step time ≤ 0.5× the naive per-expert loop (tiny, CPU)",
                            label,
                            v,
                            TARGET_NAIVE,
                            v <= TARGET_NAIVE,
                        )
                    )
        if ours in rows and "lora" in rows and wide:
            v = rows[ours]["x_lora"]
            gpu = device == "cuda"
            limit = TARGET_GPU_LORA if gpu else TARGET_LORA
            name = f"step time ≤ {limit}× PEFT LoRA ({'GPU' if gpu else 'CPU'}, hidden ≥ 1024)"
            out.append(_target(name, f"{where} ({ours})", v, limit, v <= limit))
        con = rows.get("ours-con-gram", {})
        if (tiny or result["size"] == "smollm2" or wide) and con.get("x_ours_same_path") is not None:
            limit = TARGET_CON_TINY if tiny else TARGET_CON
            v = con["x_ours_same_path"] - 1.0
            name = f"contrastive term (Gram form) adds ≤ {100 * limit:.0f} % to our step"
            out.append(_target(name, where, v, limit, v <= limit, unit="%"))
        for name, limit, what in (
            (ours, TARGET_MEM, "activation memory"),
            ("ours-con-gram", TARGET_MEM_CON, "activation memory with the contrastive term"),
        ):
            row = rows.get(name, {})
            if row.get("mem_x_lora") is not None:
                v = row["mem_x_lora"]
                label = f"{what} ≤ {limit}× PEFT LoRA (saved tensors)"
                out.append(_target(label, f"{where} ({name})", v, limit, v <= limit))
            if row.get("peak_x_lora") is not None:
                v = row["peak_x_lora"]
                label = f"{what} ≤ {TARGET_MEM}× PEFT LoRA (peak allocated)"
                out.append(_target(label, f"{where} ({name})", v, TARGET_MEM, v <= TARGET_MEM))
        generated = case.get("generate", {}).get("variants", {}).get("ours-dense", {})
        if result["size"] == "smollm2" and generated.get("tps_x_lora") is not None:
            v = generated["tps_x_lora"]
            name = "generate ≥ 0.9× PEFT LoRA's tokens/s (SmolLM2 shape)"
            out.append(_target(name, where, v, TARGET_GEN, v >= TARGET_GEN, at_least=True))
    check = result.get("checks", {}).get("compile")
    if check:
        for path, e in check["paths"].items():
            note = "" if e.get("works") else e.get("error", "")[:160].rstrip("')\"")
            out.append(
                _target(
                    "torch.compile runs the adapted model and matches eager",
                    f"{result['name']}, {path} path, backend {check['backend']}",
                    None,
                    0,
                    bool(e.get("works") and e.get("matched")),
                    note,
                )
            )
            if e.get("compiled_x_naive") is not None and device == "cpu":
                v = e["compiled_x_naive"]
                out.append(
                    _target(
                        "compiled step ≤ 0.5× the naive per-expert loop's eager step (tiny, CPU)",
                        f"{result['name']}, {path} path, torch.compile vs the naive loop in eager, dropout 0",
                        v,
                        TARGET_NAIVE,
                        v <= TARGET_NAIVE,
                    )
                )
    return out


# --- the whole run -----------------------------------------------------------------------------------------


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
                memory=not args.no_memory,
                generate=(not args.no_generate) and done == 1,
                gen_tokens=args.gen_tokens,
                gen_batch=args.gen_batch,
                gen_rounds=args.gen_rounds,
                parity=done == 1 and not args.no_parity,
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
