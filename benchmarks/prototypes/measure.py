"""Measure the fused dense-path prototype against the library, in one process, round-robin (like comoe
bench). (The batched contrastive loss, the other prototype, is now the library's own.)

python benchmarks/prototypes/measure.py --check                 # exactness of the prototype
python benchmarks/prototypes/measure.py --size smollm2 --experts 4 --steps 12
python benchmarks/prototypes/measure.py --size wide --experts 16 --steps 12 --memory
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fused_dense  # noqa: E402

from comoe.model import get_comoe_model  # noqa: E402
from comoe.tools.bench.measure import (  # noqa: E402
    make_batch,
    median,
    paired_ratio,
    saved_activation_bytes,
    time_round_robin,
    train_step,
)
from comoe.tools.bench.sizes import SIZES, build_base, build_random_llama  # noqa: E402
from comoe.tools.bench.variants import build_variant, comoe_config, shared_copy  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _set(variant: str) -> None:
    (fused_dense.patch if variant.endswith("fused") else fused_dense.unpatch)()


def check() -> None:
    spec = SIZES["tiny"]
    base = build_random_llama(spec, torch.device("cpu"), torch.float32, 0)
    batch = make_batch(base, spec, 2, 16, torch.device("cpu"), 0)
    mask = batch.attention_mask.clone()
    mask[0, -5:] = 0
    for experts, k, r, targets in [(4, 2, 16, TARGETS), (6, 3, 8, TARGETS + ["gate_proj", "down_proj"])]:
        results = []
        for variant in ("library", "fused"):
            _set(variant)
            torch.manual_seed(0)
            cfg = comoe_config(experts, r, k, targets, path="dense", contrastive="gram", dropout=0.0)
            cfg.anchor = "all"
            model = get_comoe_model(shared_copy(base), cfg).train()
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for n, p in sorted(model.adapter_state_dict().items()):
                    if n.endswith(("comoe_B", "comoe_router")):
                        p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if n.endswith("comoe_B") else 1))
            out = model(inputs_embeds=batch.embeds, attention_mask=mask, labels=batch.input_ids)
            out.loss.backward()
            aux = model.last_aux
            results.append(
                [out.loss.detach(), aux.contrastive.detach(), aux.pos_cos, aux.neg_cos]
                + [p.grad for _, p in sorted(model.adapter_state_dict().items())]
            )
        for other in results[1:]:
            for x, y in zip(results[0], other, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)
        print(f"E={experts} k={k} r={r}: fused matches the library (loss, cos means, all grads)")
    _set("library")


def measure(size: str, experts: int, steps: int, memory: bool) -> None:
    torch.set_num_threads(1)
    spec = SIZES[size]
    base, _ = build_base(spec, torch.device("cpu"), torch.float32, 0, False)
    base.train()
    batch = make_batch(base, spec, spec.batch, spec.seq, torch.device("cpu"), 0)
    names = {
        "ours-dense": "ours-dense",
        "ours-dense-fused": "ours-dense",
        "con-gram": "ours-con-gram",
        "con-gram-fused": "ours-con-gram",
    }
    built = {
        n: build_variant(
            v, base, experts=experts, rank=16, top_k=2, targets=TARGETS, con_path="dense", seed=0
        )
        for n, v in names.items()
    }

    def call(n):
        _set(n)
        train_step(built[n], batch)

    times = time_round_robin({n: (lambda n=n: call(n)) for n in built}, steps, 2, torch.device("cpu"), 0)
    for n in built:
        print(
            f"{size} E={experts} {n:17s} {1e3 * median(times[n]):8.1f} ms  "
            f"x ours-dense {paired_ratio(times[n], times['ours-dense']):.3f}"
        )
    if memory:
        for n in built:
            _set(n)
            torch.manual_seed(0)
            print(
                f"{size} E={experts} {n:17s} saved {saved_activation_bytes(built[n], batch)[0] / 2**20:.2f} MiB"
            )
    _set("library")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--size", default="smollm2", choices=list(SIZES))
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--memory", action="store_true")
    a = ap.parse_args()
    if a.check:
        check()
    else:
        measure(a.size, a.experts, a.steps, a.memory)
