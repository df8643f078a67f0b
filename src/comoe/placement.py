"""Where an adapter goes: which modules a ``CoMoEConfig`` adapts, which layer kind each gets, and how many
trainable parameters that adds — counted on layers built by the same constructors on the meta device, so
the count follows the layers whatever their code, and costs no memory whatever the base's size.
"""

from __future__ import annotations

import torch
from torch import nn

from comoe.config import CoMoEConfig
from comoe.ffn import CoMoEFFNLayer, ffn_targets, is_gated_mlp, shared_lora_config
from comoe.frozen import Conv1D, layer_features
from comoe.layer import CoMoELayer
from comoe.mixture import MixtureLayer
from comoe.targets import find_targets
from comoe.trace import ForwardContext


class AdapterTargets:
    """The modules ``config`` adapts in ``model``: MLP blocks that become mixtures of FFN experts
    (placement='ffn') and linears that become mixtures of LoRA experts (one plain LoRA each beside FFN
    experts). Resolved before any module changes, so a refused config leaves the model as it was."""

    def __init__(self, model: nn.Module, config: CoMoEConfig):
        if config.placement == "ffn":
            blocks, linears = ffn_targets(model, config)
        else:
            blocks, linears = [], find_targets(model, config)
        self.ffn_blocks: list[str] = blocks
        self.linears: list[str] = linears

    @property
    def names(self) -> set[str]:
        return set(self.ffn_blocks) | set(self.linears)


def build_layer(
    target: nn.Module,
    name: str,
    config: CoMoEConfig,
    targets: AdapterTargets,
    context: ForwardContext,
    adapter_name: str = "default",
) -> MixtureLayer:
    """The adapter layer that wraps the module ``name`` (``target``)."""
    if name in targets.ffn_blocks:
        return CoMoEFFNLayer(target, config, context, name, adapter_name)
    if config.placement == "ffn":  # MixLoRA's layout: one plain LoRA on the other target linears
        return CoMoELayer(target, shared_lora_config(config), context, name, adapter_name)
    return CoMoELayer(target, config, context, name, adapter_name)


def adapter_parameter_count(model: nn.Module, config: CoMoEConfig) -> int:
    """Trainable parameters the adapter of ``config`` adds to ``model``: the sum over the layers
    ``get_comoe_model`` would build, each built here around a meta-device stand-in of its target."""
    targets = AdapterTargets(model, config)
    context = ForwardContext()
    total = 0
    for name in sorted(targets.names):
        layer = build_layer(_meta_stand_in(model.get_submodule(name)), name, config, targets, context)
        total += sum(p.numel() for p in layer.adapter_parameters())
    return total


class _GatedMLPShape(nn.Module):
    """A gated MLP's shape on the meta device: what FFN experts are built around."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        for proj in ("gate_proj", "up_proj", "down_proj"):
            linear = getattr(mlp, proj)
            setattr(self, proj, nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta"))
        self.act_fn = mlp.act_fn

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _meta_stand_in(module: nn.Module) -> nn.Module:
    """A module of ``module``'s class of layer and sizes, its weights on the meta device (a quantised
    linear's stand-in is a plain linear of its logical size)."""
    if is_gated_mlp(module):
        return _GatedMLPShape(module)
    d_in, d_out = layer_features(module)
    if Conv1D != () and isinstance(module, Conv1D):
        with torch.device("meta"):
            return Conv1D(d_out, d_in)
    return nn.Linear(d_in, d_out, bias=getattr(module, "bias", None) is not None, device="meta")
