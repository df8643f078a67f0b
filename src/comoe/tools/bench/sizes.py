"""Model and batch presets of `comoe bench` and the base models built from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from comoe.tools.bench.variants import DEFAULT_VARIANTS


# --- sizes --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SizeSpec:
    """A LLaMA-shaped model and the batch it is benchmarked on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    tie_embeddings: bool = False
    pretrained: str | None = None  # an alias of comoe.training.base_models.load_base_model, tried first
    device: str = "cpu"
    dtype: str = "float32"
    experts: tuple[int, ...] = (4,)
    ranks: tuple[int, ...] = (16,)
    threads: int | None = 1  # CPU: one intra-op thread (see BENCHMARKS.md: 2 threads were slower and noisier)
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    description: str = ""


SIZES: dict[str, SizeSpec] = {
    "tiny": SizeSpec(
        hidden=64,
        intermediate=172,
        layers=2,
        heads=4,
        kv_heads=2,
        vocab=512,
        batch=4,
        seq=64,
        description="random-init LLaMA, hidden 64, 2 layers: where per-op overhead dominates",
    ),
    "smollm2": SizeSpec(
        hidden=576,
        intermediate=1536,
        layers=30,
        heads=9,
        kv_heads=3,
        vocab=49152,
        batch=1,
        seq=128,
        tie_embeddings=True,
        pretrained="smollm2-135m",
        variants=("base", "lora", "naive", "ours-dense", "ours-con-gram"),
        description="SmolLM2-135M (real weights when available, else random of the same shape)",
    ),
    "wide": SizeSpec(
        hidden=1024,
        intermediate=2816,
        layers=2,
        heads=16,
        kv_heads=16,
        vocab=2048,
        batch=2,
        seq=128,
        description="random-init LLaMA-2-shaped layers, hidden 1024, 2 layers, vocab 2048 (per-layer costs dominate)",
    ),
    "gpu7b": SizeSpec(
        hidden=4096,
        intermediate=11008,
        layers=2,
        heads=32,
        kv_heads=32,
        vocab=32000,
        batch=4,
        seq=512,
        device="cuda",
        dtype="bfloat16",
        experts=(4, 8, 16, 64),
        ranks=(8, 16, 64),
        threads=None,
        description="LLaMA-2-7B-shaped layers (2 of 32), random weights, bf16, CUDA",
    ),
}


def build_random_llama(spec: SizeSpec, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """A random-init ``LlamaForCausalLM`` of ``spec``'s shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=max(2048, 2 * spec.seq),
        tie_word_embeddings=spec.tie_embeddings,
        attention_dropout=0.0,
        attn_implementation="sdpa",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype)


def build_base(
    spec: SizeSpec, device: torch.device, dtype: torch.dtype, seed: int, random_init: bool
) -> tuple[nn.Module, str]:
    """The base model and a note on where its weights came from."""
    if spec.pretrained and not random_init:
        try:
            from comoe.training.base_models import load_base_model

            model, _ = load_base_model(spec.pretrained, dtype=dtype)
            return model.to(device), f"pretrained {spec.pretrained}"
        except Exception as err:  # noqa: BLE001 - any failure falls back to the same shape, random
            note = f"random init (loading {spec.pretrained} failed: {type(err).__name__}: {err})"
            return build_random_llama(spec, device, dtype, seed), note[:300]
    return build_random_llama(spec, device, dtype, seed), "random init"
