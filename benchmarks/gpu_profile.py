"""Where a training step's time goes on a GPU: PEFT LoRA vs comoe's layers, under torch.profiler.

For each variant (built as `comoe bench` builds it, on one shared LLaMA-2-7B-shaped base) it reports the
wall time of a step, the time the GPU spent in kernels during it, the kernels launched, and the operators
that took the most host time. A GPU busy for much less than the wall time is waiting for the Python side to
launch work: there, fewer operators per module is what speeds a step up, not fewer FLOPs.

    python benchmarks/gpu_profile.py [--size gpu7b] [--experts 4] [--rank 16] [--batch 4] [--autocast bfloat16]
                                     [--out benchmarks/results/gpu-profile.json]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from comoe.tools.bench.measure import make_batch, train_step
from comoe.tools.bench.sizes import SIZES, build_random_llama
from comoe.tools.bench.variants import build_variant
from comoe.utils.machine import machine_info

VARIANTS = ("lora", "ours-dense", "ours-grouped", "ours-con-gram")


def _device_time_us(event) -> float:
    """An event's own time on the device (µs); the attribute's name changed across torch versions."""
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile_variant(variant, batch, device: torch.device, steps: int) -> dict:
    """Wall ms per step, GPU kernel ms per step, kernels per step, and the top operators by host time."""
    for _ in range(3):  # warm-up: allocator, cuBLAS handles, autotuning
        train_step(variant, batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(variant, batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(
        e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total for e in kernels
    )
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {
        "wall_ms": 1e3 * wall,
        "gpu_kernel_ms": gpu_us / 1e3 / steps,
        "gpu_busy": (gpu_us / 1e6 / steps) / wall if kernels else None,
        "kernels_per_step": len(kernels) / steps,
        "aten_calls_per_step": sum(e.count for e in ops if e.key.startswith("aten::")) / steps,
        "top_host_ops": [
            {
                "op": e.key,
                "calls_per_step": e.count / steps,
                "host_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
                "device_ms_per_step": _device_time_us(e) / 1e3 / steps,
            }
            for e in ops[:12]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", choices=tuple(SIZES), default="gpu7b", help="model shape (a comoe bench preset)"
    )
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--autocast", choices=("bfloat16", "none"), default="bfloat16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", default="benchmarks/results/gpu-profile.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spec = replace(SIZES[args.size], batch=args.batch, layers=args.layers, seq=args.seq)
    base = build_random_llama(spec, device, torch.bfloat16 if device.type == "cuda" else torch.float32, 0)
    base.train()
    autocast = torch.bfloat16 if args.autocast == "bfloat16" else None
    batch = make_batch(base, spec, spec.batch, spec.seq, device, 0, autocast)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    result = {
        "command": "python benchmarks/gpu_profile.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "machine": machine_info(device),
        "settings": {**vars(args), "tokens_per_step": batch.tokens},
        "variants": {},
    }
    for name in args.variants.split(","):
        variant = build_variant(
            name,
            base,
            experts=args.experts,
            rank=args.rank,
            top_k=2,
            targets=targets,
            con_path="auto",
            seed=0,
        )
        result["variants"][name] = profile_variant(variant, batch, device, args.steps)
        del variant
    print(f"{'variant':<14} {'wall ms':>8} {'GPU ms':>8} {'GPU busy':>9} {'kernels':>8} {'aten ops':>9}")
    for name, r in result["variants"].items():
        busy = f"{100 * r['gpu_busy']:.0f} %" if r["gpu_busy"] is not None else "-"
        print(
            f"{name:<14} {r['wall_ms']:8.1f} {r['gpu_kernel_ms']:8.1f} {busy:>9} {r['kernels_per_step']:8.0f} "
            f"{r['aten_calls_per_step']:9.0f}"
        )
    for name, r in result["variants"].items():
        print(f"\n{name}: top host ops (ms per step, calls per step)")
        for op in r["top_host_ops"][:8]:
            print(f"  {op['op'][:48]:<48} {op['host_ms_per_step']:7.2f} {op['calls_per_step']:7.0f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
