"""One case of `comoe bench`: an (E, r) point, every variant built, timed round-robin, then memory,
generation and the same-function check."""

from __future__ import annotations

import gc
import statistics
from collections.abc import Callable

import torch
from torch import nn

from comoe.compiling import compile_layers
from comoe.tools.bench.compile_check import _first_line
from comoe.tools.bench.measure import (
    Batch,
    generate_fn,
    host_syncs_per_step,
    median,
    paired_ratio,
    peak_step_bytes,
    saved_activation_bytes,
    time_round_robin,
    train_step,
)
from comoe.tools.bench.parity import parity_check
from comoe.tools.bench.sizes import SizeSpec
from comoe.tools.bench.variants import GENERATE_VARIANTS, Variant, auto_path, build_variant


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
    compile: bool = False,
) -> dict:
    """Build every variant for one (E, r), time them round-robin, then measure memory and generation.
    With ``compile``, every variant's decoder layers are compiled first (the warm-up step compiles), and
    generation runs with a static KV cache, whose decode step transformers compiles on a GPU."""
    built: dict[str, Variant] = {}
    compiled = {}  # variant -> its compiled layers, restored before generation
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
            if compile:
                compiled[name] = compile_layers(built[name].model)
        except (ValueError, torch.OutOfMemoryError) as err:
            built.pop(
                name, None
            )  # built, but its layers would not compile: not timed eagerly beside the rest
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
                if n in compiled:  # generation compiles its own decode step (static cache)
                    compiled[n].restore()
            gen = torch.Generator().manual_seed(seed + 7)
            vocab = base.get_input_embeddings().weight.shape[0]
            prompt = torch.randint(3, vocab, (gen_batch, 16), generator=gen).to(device)
            gtimes = time_round_robin(
                {
                    n: generate_fn(built[n], prompt, gen_tokens, batch.autocast, static_cache=compile)
                    for n in gen_variants
                },
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
                "cache": "static" if compile else "dynamic",
                "variants": grow,
            }
    if parity:
        case["parity"] = parity_check(built, batch, seed)
    del built, fns
    gc.collect()
    return case
