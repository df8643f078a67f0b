"""The variants `comoe bench` compares, built on one shared frozen base."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from comoe.config import CoMoEConfig
from comoe.frozen import layer_features
from comoe.layer import CoMoELayer
from comoe.model import find_targets, get_comoe_model
from comoe.tools.bench.naive import inject_naive

VARIANTS = (
    "base",
    "lora",
    "lora-dora",
    "naive",
    "ours-dense",
    "ours-grouped",
    "ours-con-gram",
    "ours-con-mat",
    "ours-dora",
    "ours-dora-con",
    "ours-ffn",
    "ours-ffn-con",
)
OURS = ("ours-dense", "ours-grouped", "ours-con-gram", "ours-con-mat", "ours-dora", "ours-dora-con")
FFN_VARIANTS = ("ours-ffn", "ours-ffn-con")
# a size's default set: the FFN variants are compared on gate/up/down targets (a run of their own)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if v not in FFN_VARIANTS)
GENERATE_VARIANTS = ("base", "lora", "ours-dense", "ours-grouped")
VARIANT_HELP = {
    "base": "frozen base, forward + backward to the inputs",
    "lora": "PEFT LoRA (same r, modules, alpha, dropout)",
    "lora-dora": "PEFT LoRA with use_dora (DoRA, same r)",
    "naive": "per-expert-loop MoE-LoRA (MoE-PEFT/MixLoRA style)",
    "ours-dense": "CoMoE layer, dense codes, λ = 0",
    "ours-grouped": "CoMoE layer, grouped_mm, λ = 0",
    "ours-con-gram": "CoMoE + contrastive, Gram form",
    "ours-con-mat": "CoMoE + contrastive, materialised (paper)",
    "ours-dora": "CoMoE-DoRA experts, λ = 0",
    "ours-dora-con": "CoMoE-DoRA experts + contrastive (materialised outputs)",
    "ours-ffn": "whole-FFN experts on each MLP block (MixLoRA's layout), λ = 0; plain LoRA on the other targets",
    "ours-ffn-con": "whole-FFN experts + contrastive (materialised FFN updates)",
}


# --- variants ----------------------------------------------------------------------------------------
@dataclass
class Variant:
    name: str
    model: nn.Module  # what is called: the base, the PEFT model, the CoMoE wrapper
    optimizer: torch.optim.Optimizer | None
    paths: str = ""  # CoMoE expert paths in use
    trainable: int = 0
    naive_layers: dict | None = None


def variant_config(
    experts: int,
    rank: int,
    top_k: int,
    targets: list[str],
    *,
    path: str = "auto",
    contrastive: str | None = None,
    dropout: float = 0.05,
    dora: bool = False,
    placement: str = "linear",
) -> CoMoEConfig:
    """The adapter config of a bench variant: rank r, alpha 2r, λ = 0.01 with a contrastive form, else 0."""
    return CoMoEConfig(
        r=rank,
        lora_alpha=2.0 * rank,
        lora_dropout=dropout,
        num_experts=experts,
        top_k=top_k,
        target_modules=list(targets),
        expert_path=path,
        contrastive_weight=0.01 if contrastive else 0.0,
        contrastive_form=contrastive or "gram",
        use_dora=dora,
        placement=placement,
    )


def shared_copy(base: nn.Module) -> nn.Module:
    """A deep copy of ``base`` whose parameters and buffers are the very same tensors (no extra memory)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def build_variant(
    name: str,
    base: nn.Module,
    *,
    experts: int,
    rank: int,
    top_k: int,
    targets: list[str],
    con_path: str,
    seed: int,
) -> Variant:
    """A fresh adapted copy of ``base`` (sharing its frozen weights) for variant ``name``."""
    model = shared_copy(base)
    torch.manual_seed(seed)
    naive_layers = None
    if name == "base":
        for p in model.parameters():
            p.requires_grad_(False)
        wrapped = model
    elif name in ("lora", "lora-dora"):
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=rank,
            lora_alpha=2.0 * rank,
            lora_dropout=0.05,
            target_modules=list(targets),
            bias="none",
            use_dora=name == "lora-dora",
        )
        wrapped = get_peft_model(model, cfg)
    elif name == "naive":
        naive_layers = inject_naive(model, variant_config(experts, rank, top_k, targets))
        wrapped = model
    elif name in OURS:
        path = {"ours-dense": "dense", "ours-grouped": "grouped"}.get(name, con_path)
        form = {"ours-con-gram": "gram", "ours-con-mat": "materialized", "ours-dora-con": "materialized"}.get(
            name
        )
        config = variant_config(
            experts, rank, top_k, targets, path=path, contrastive=form, dora=name.startswith("ours-dora")
        )
        wrapped = get_comoe_model(model, config)
    elif name in FFN_VARIANTS:
        form = "materialized" if name == "ours-ffn-con" else None
        config = variant_config(experts, rank, top_k, targets, contrastive=form, placement="ffn")
        wrapped = get_comoe_model(model, config)
    else:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    wrapped.train()
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return Variant(
        name, wrapped, optimizer, expert_paths(wrapped), sum(p.numel() for p in params), naive_layers
    )


def expert_paths(model: nn.Module) -> str:
    """The CoMoE expert paths the model's layers use ('dense', 'grouped', 'dense+grouped'), or ''."""
    return "+".join(sorted({m.expert_path for m in model.modules() if isinstance(m, CoMoELayer)}))


def auto_path(
    base: nn.Module,
    experts: int,
    rank: int,
    top_k: int,
    targets: list[str],
    autocast: torch.dtype | None = None,
) -> str:
    """Which paths ``expert_path='auto'`` picks here (under ``autocast``, as the forward runs): asks a real
    ``CoMoELayer`` per distinct target shape."""
    from comoe.trace import ForwardContext

    cfg = variant_config(experts, rank, top_k, targets)
    chosen, seen = set(), set()
    for name in find_targets(base, cfg):
        module = base.get_submodule(name)
        shape = layer_features(module)
        if shape not in seen:
            seen.add(shape)
            layer = CoMoELayer(module, cfg, ForwardContext(), name)
            device = layer.experts.comoe_A.device.type
            with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                chosen.add(layer.expert_path)
    return "+".join(sorted(chosen))
