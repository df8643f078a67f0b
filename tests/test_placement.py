"""Where an adapter goes and what it adds (``comoe.placement``): parameter counts come from layers built by
the real constructors on the meta device, so they equal a wrapped model's trainable count for every kind,
and cost no memory for a base of any size."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comoe import CoMoEConfig, get_comoe_model
from comoe.placement import adapter_parameter_count
from tests.tiny_models import build, tiny_comoe_config

KINDS = {
    "lora experts": dict(),
    "dora experts": dict(use_dora=True),
    "ffn experts": dict(placement="ffn", target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    "single expert": dict(num_experts=1, top_k=1, contrastive_weight=0.0),
    "top-p": dict(routing="topp", top_k=3),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_count_is_the_wrapped_models_trainable_count(kind, family):
    overrides = KINDS[kind]
    if family == "gpt2" and overrides.get("placement") == "ffn":
        pytest.skip("GPT-2's MLP is not gated: no FFN experts")
    config = tiny_comoe_config(family, **overrides)
    counted = adapter_parameter_count(build(family), config)
    model = get_comoe_model(build(family), config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counted == trainable == model.get_nb_trainable_parameters()[0]


def test_a_7b_base_on_the_meta_device_is_counted_without_memory():
    """LLaMA-2-7B's shapes, never allocated: q/k/v/o of 32 layers, E = 4, r = 16, a router each."""
    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
    )
    with torch.device("meta"):
        base = LlamaForCausalLM(cfg)
    config = CoMoEConfig(
        r=16, num_experts=4, top_k=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    per_module = 4 * 16 * (4096 + 4096) + 4 * 4096  # experts' A and B, the router
    assert adapter_parameter_count(base, config) == 32 * 4 * per_module
