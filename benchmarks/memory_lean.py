"""What the memory-lean pieces of the training step cost and save, measured in one process.

The dense expert path runs as one autograd node (``comoe.dense``) and the contrastive loss's cosines are
recomputed in backward (``comoe.recompute``). This script times each against the plain ops it replaces
(the library with those two pieces swapped for plain autograd, by monkeypatching ``comoe.layer`` and
``comoe.auxiliary``),
round-robin like ``comoe bench``, and measures the saved activations of each, all as ratios to PEFT LoRA:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/memory_lean.py --size smollm2 --steps 20 \
        --out benchmarks/results/memory-lean-smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import comoe.auxiliary
import comoe.layer
from comoe.dense import plain_dense_experts
from comoe.tools.bench.measure import (
    make_batch,
    median,
    paired_ratio,
    saved_activation_bytes,
    time_round_robin,
    train_step,
)
from comoe.tools.bench.sizes import SIZES, build_base
from comoe.tools.bench.variants import build_variant

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
LIBRARY = (comoe.layer.dense_experts, comoe.auxiliary.recomputed)


def plain_recomputed(fn, *inputs, differentiable=1):
    """The cosines kept by autograd instead of recomputed."""
    return tuple(fn(*inputs))


# name -> (comoe bench variant, lean dense node, recomputed cosines)
VARIANTS = {
    "lora": ("lora", True, True),
    "dense (library)": ("ours-dense", True, True),
    "dense, plain ops": ("ours-dense", False, True),
    "contrastive (library)": ("ours-con-gram", True, True),
    "contrastive, plain ops": ("ours-con-gram", False, False),
}


def use(name: str) -> None:
    _, lean_dense, lean_loss = VARIANTS[name]
    comoe.layer.dense_experts = LIBRARY[0] if lean_dense else plain_dense_experts
    comoe.auxiliary.recomputed = LIBRARY[1] if lean_loss else plain_recomputed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="smollm2", choices=["tiny", "smollm2", "wide"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    spec = SIZES[args.size]
    base, _ = build_base(spec, torch.device("cpu"), torch.float32, 0, False)
    base.train()
    batch = make_batch(base, spec, spec.batch, spec.seq, torch.device("cpu"), 0)
    built = {
        name: build_variant(v, base, experts=4, rank=16, top_k=2, targets=TARGETS, con_path="dense", seed=0)
        for name, (v, _, _) in VARIANTS.items()
    }

    def step(name: str) -> None:
        use(name)
        train_step(built[name], batch)

    times = time_round_robin({n: (lambda n=n: step(n)) for n in built}, args.steps, 2, torch.device("cpu"), 0)
    rows = []
    for name in built:
        use(name)
        torch.manual_seed(0)
        saved = saved_activation_bytes(built[name], batch)[0]
        rows.append(
            {
                "variant": name,
                "step_ms": 1e3 * median(times[name]),
                "time_x_lora": paired_ratio(times[name], times["lora"]),
                "saved_mib": saved / 2**20,
            }
        )
    use("lora")
    lora_saved = rows[0]["saved_mib"]
    print(f"{args.size}, E = 4, r = 16, top-2, q/k/v/o; {args.steps} alternated rounds, 1 thread\n")
    print("| variant | step ms | × PEFT LoRA | saved activations MiB | × PEFT LoRA |\n|---|---|---|---|---|")
    for row in rows:
        row["saved_x_lora"] = row["saved_mib"] / lora_saved
        print(
            f"| {row['variant']} | {row['step_ms']:.1f} | {row['time_x_lora']:.3f}× | {row['saved_mib']:.1f} | "
            f"{row['saved_x_lora']:.2f}× |"
        )
    if args.out:
        command = f"benchmarks/memory_lean.py --size {args.size} --steps {args.steps} --out {args.out}"
        args.out.write_text(
            json.dumps({"command": command, "size": args.size, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
