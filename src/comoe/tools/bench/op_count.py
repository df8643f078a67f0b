"""How many ATen operators a training step dispatches, per adapted module, against PEFT LoRA.

On a GPU a step at a few thousand tokens is host-bound: every operator that reaches a kernel costs a
launch and some microseconds of Python and dispatcher. This counts them on the CPU, where the count is
the same: a ``TorchDispatchMode`` sees every ATen call below autograd (views and in-place ops included,
composite ops as what they decompose into), in the forward (loss and auxiliary losses included) and the
backward of one training step; ``zero_grad`` and the optimizer step are left out (the same for every
variant up to the number of parameter tensors). Per adapted module = (variant − LoRA) / modules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from comoe.tools.bench.measure import Batch, make_batch
from comoe.tools.bench.sizes import SIZES, build_random_llama
from comoe.tools.bench.variants import Variant, build_variant

OP_COUNT_VARIANTS = ("lora", "ours-dense", "ours-con-gram")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


class OpCounter(TorchDispatchMode):
    """Counts every ATen operator dispatched while active, by name (``aten.mm.default``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count_step(variant: Variant, batch: Batch) -> dict[str, Counter[str]]:
    """The operators of one training step's forward and backward (``{"forward": ..., "backward": ...}``)."""
    if variant.optimizer is not None:
        variant.optimizer.zero_grad(set_to_none=True)
    with OpCounter() as fwd, batch.forward_context():
        out = variant.model(
            inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, labels=batch.input_ids
        )
    with OpCounter() as bwd:
        out.loss.backward()
    return {"forward": fwd.ops, "backward": bwd.ops}


def adapted_modules(variant: Variant) -> int:
    """The number of adapted linears: PEFT LoRA's and comoe's tuner layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(m, BaseTunerLayer) for m in variant.model.modules())


def count_ops(
    layers: int = 4,
    experts: int = 4,
    ranks: tuple[int, ...] = (8, 16),
    top_k: int = 2,
    seed: int = 0,
    variants: tuple[str, ...] = OP_COUNT_VARIANTS,
) -> dict:
    """Operators per training step of each variant on a ``layers``-layer tiny Llama (q/k/v/o adapted), and
    per adapted module above PEFT LoRA, for each rank (the counts do not depend on the shapes)."""
    spec = replace(SIZES["tiny"], layers=layers)
    device = torch.device("cpu")
    base = build_random_llama(spec, device, torch.float32, seed)
    base.train()
    batch = make_batch(base, spec, spec.batch, spec.seq, device, seed)
    result: dict = {"layers": layers, "experts": experts, "top_k": top_k, "tokens": batch.tokens, "cases": []}
    for rank in ranks:
        case: dict = {"rank": rank, "variants": {}}
        for name in variants:
            variant = build_variant(
                name,
                base,
                experts=experts,
                rank=rank,
                top_k=top_k,
                targets=TARGETS,
                con_path="auto",
                seed=seed,
            )
            torch.manual_seed(seed)
            count_step(variant, batch)  # warm-up: lazy initialisation dispatches too
            torch.manual_seed(seed)
            phases = count_step(variant, batch)
            case["variants"][name] = {
                "modules": adapted_modules(variant),
                "forward": sum(phases["forward"].values()),
                "backward": sum(phases["backward"].values()),
                "total": sum(phases["forward"].values()) + sum(phases["backward"].values()),
                "ops": {phase: dict(sorted(ops.items())) for phase, ops in phases.items()},
            }
        lora = case["variants"].get("lora")
        if lora is not None:
            for counts in case["variants"].values():
                modules = counts["modules"] or lora["modules"]
                counts["extra_per_module"] = round((counts["total"] - lora["total"]) / modules, 2)
        result["cases"].append(case)
    return result


@torch.no_grad()
def count_decode_ops(
    layers: int = 4, experts: int = 4, rank: int = 16, top_k: int = 2, seed: int = 0
) -> dict:
    """Operators of one greedy decode step (one new token for a batch of 4 after a 16-token prompt, dynamic
    KV cache, eval mode) of PEFT LoRA and ours (dense path), and ours per adapted module above LoRA."""
    spec = replace(SIZES["tiny"], layers=layers)
    base = build_random_llama(spec, torch.device("cpu"), torch.float32, seed).eval()
    prompt = torch.randint(3, spec.vocab, (4, 16), generator=torch.Generator().manual_seed(seed))
    counts: dict[str, dict] = {}
    for name in ("lora", "ours-dense"):
        variant = build_variant(
            name, base, experts=experts, rank=rank, top_k=top_k, targets=TARGETS, con_path="auto", seed=seed
        )
        model = variant.model.eval()
        out = model(input_ids=prompt, use_cache=True)
        token, cache = out.logits[:, -1:].argmax(-1), out.past_key_values
        model(input_ids=token, past_key_values=cache, use_cache=True)  # warm-up
        with OpCounter() as ops:
            model(input_ids=token, past_key_values=cache, use_cache=True)
        counts[name] = {
            "modules": adapted_modules(variant),
            "total": ops.total,
            "ops": dict(sorted(ops.ops.items())),
        }
    lora, ours = counts["lora"], counts["ours-dense"]
    extra = Counter(ours["ops"])
    extra.subtract(lora["ops"])
    return {
        "layers": layers,
        "experts": experts,
        "rank": rank,
        "top_k": top_k,
        "variants": counts,
        "extra_per_module": round((ours["total"] - lora["total"]) / lora["modules"], 2),
        "extra_ops_per_module": {k: round(v / lora["modules"], 2) for k, v in sorted(extra.items()) if v},
    }


def op_count_table(result: dict) -> list[str]:
    """Markdown rows: each variant's operators per step and per adapted module above LoRA."""
    lines = [
        "| rank | variant | forward ops | backward ops | per step | per adapted module above LoRA |",
        "|---|---|---|---|---|---|",
    ]
    for case in result["cases"]:
        for name, counts in case["variants"].items():
            extra = counts.get("extra_per_module")
            lines.append(
                f"| {case['rank']} | {name} | {counts['forward']} | {counts['backward']} | {counts['total']} | "
                f"{'–' if extra is None else f'{extra:+.1f}'} |"
            )
    return lines
