"""Outputs and gradients of every adapter kind on fixed inputs, to hold the core to what comoe 0.1 computed.

``python tests/core_reference.py`` writes ``tests/fixtures/core-reference-0.1.safetensors`` (run once, by the
code whose behaviour is the reference); ``tests/test_core_reference.py`` recomputes every case and compares.
Each case trains one step's forward and backward on a tiny Llama (loss, its auxiliary parts, logits, every
adapter gradient) and runs one evaluation forward (logits), with dropout on, so that the draws of dropout
masks, anchors and negatives are part of what must stay the same.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `tests` importable when run as a script

from comoe.compat import legacy_adapter_name  # noqa: E402
from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "core-reference-0.1.safetensors"

# name -> CoMoEConfig overrides (tiny_comoe_config's defaults: r 4, E 4, k 2, lambda 0.1, q/k/v/o)
CASES: dict[str, dict] = {
    "lora-topk": dict(lora_dropout=0.1, balance_weight=0.01),
    "lora-anchor-all": dict(anchor="all", num_negatives=1, lora_dropout=0.1),
    # E*r = 64 > 24 tokens: comoe 0.1 took the anchor form here, grouped by d_out (anchor "all": no draws)
    "lora-anchor-form": dict(num_experts=8, r=8, lora_alpha=16, top_k=3, anchor="all"),
    "lora-materialized": dict(contrastive_form="materialized", lora_dropout=0.1),
    "lora-grouped": dict(expert_path="grouped", lora_dropout=0.1, balance_weight=0.01),
    "soft": dict(routing="soft", top_k=4, contrastive_weight=0.0, balance_weight=0.01, lora_dropout=0.1),
    "single-expert": dict(num_experts=1, top_k=1, contrastive_weight=0.0, lora_dropout=0.1),
    "dora": dict(use_dora=True, lora_dropout=0.1, balance_weight=0.01),
    "ffn": dict(
        placement="ffn",
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.1,
        balance_weight=0.01,
    ),
}


def run_case(name: str) -> dict[str, torch.Tensor]:
    """One case's tensors: train loss and aux parts, train logits, adapter gradients, eval logits."""
    from comoe import get_comoe_model

    model = get_comoe_model(build("llama", num_layers=2), tiny_comoe_config("llama", **CASES[name]))
    randomize_adapters(model, seed=7)
    inputs = batch("llama", seed=3, batch_size=2, seq_len=12, pad=3)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    torch.manual_seed(11)
    model.train()
    out = model(**inputs, labels=labels)
    out.loss.backward()
    tensors = {"train/loss": out.loss.detach(), "train/logits": out.logits.detach()}
    for key in ("aux_loss", "contrastive_loss", "balance_loss"):
        if key in out:
            tensors[f"train/{key}"] = out[key].detach()
    for param_name, param in model.named_parameters():
        if param.grad is not None:
            tensors[f"grad/{legacy_adapter_name(param_name)}"] = param.grad  # the reference's names
    model.eval()
    with torch.no_grad():
        tensors["eval/logits"] = model(**inputs).logits
    return {f"{name}/{key}": value.detach().contiguous().clone() for key, value in tensors.items()}


def main() -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    tensors = {}
    for name in CASES:
        tensors.update(run_case(name))
    save_file(tensors, str(FIXTURE))
    print(f"wrote {len(tensors)} tensors of {len(CASES)} cases to {FIXTURE}")


if __name__ == "__main__":
    main()
