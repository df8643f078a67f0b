"""Whole-FFN experts on MLP blocks (MixLoRA's design): which blocks ``placement='ffn'`` adapts, and the
layer that wraps one. The experts themselves, and the math, are in ``comoe.ffn_experts``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.ffn_experts import is_gated_mlp
from comoe.mixture import MixtureLayer
from comoe.targets import find_targets, layer_index, matching_modules, num_hidden_layers, resolve_layers
from comoe.trace import ForwardContext

SUPPORTED = (
    "MLP blocks with gate_proj, up_proj and down_proj linears and an act_fn, computing "
    "down_proj(act_fn(gate_proj(x)) * up_proj(x)): Llama, Qwen2/3, Mistral, Gemma 1-3, OLMo 2, Granite, SmolLM"
)
_MLP_NAMES = ("mlp", "feed_forward", "ffn")  # what a block's MLP is called, to name the ones not recognised


def find_mlp_blocks(model: nn.Module, config: CoMoEConfig) -> list[str]:
    """Names of the MLP blocks that ``config`` (placement='ffn') turns into mixtures of FFN experts, in the
    layers it selects; a clear error when a selected block is not a gated MLP, or none is found."""
    blocks = [name for name, m in model.named_modules() if name and is_gated_mlp(m)]
    others = [
        (name, type(m).__name__)
        for name, m in model.named_modules()
        if name.rsplit(".", 1)[-1] in _MLP_NAMES and not is_gated_mlp(m)
    ]
    allowed = resolve_layers(config.layers, num_hidden_layers(model, [n for n, _ in others] + blocks))
    if allowed is not None:
        blocks = [name for name in blocks if layer_index(name) in allowed]
        others = [(name, kind) for name, kind in others if layer_index(name) in allowed]
    if others:
        name, kind = others[0]
        raise ValueError(
            f"placement='ffn' cannot make experts of {name} ({kind}): it supports {SUPPORTED}. "
            f"Use placement='linear' (experts on individual linears) for {type(model).__name__}"
        )
    if not blocks:
        raise ValueError(
            f"placement='ffn' found no MLP block in {type(model).__name__}: it supports {SUPPORTED}. "
            "Use placement='linear'"
        )
    return blocks


def ffn_targets(model: nn.Module, config: CoMoEConfig) -> tuple[list[str], list[str]]:
    """(MLP blocks for FFN experts, other target linears for one shared LoRA each) under placement='ffn'.

    Target linears inside a block (e.g. gate_proj under 'all-linear') are part of its FFN experts; a name
    that matches no linear at all is the same error as under placement='linear'."""
    blocks = find_mlp_blocks(model, config)
    inside = tuple(f"{block}." for block in blocks)
    matched = matching_modules(model, config.target_modules)
    if not matched:
        find_targets(model, config)  # raises its error, naming the model's adaptable modules
    allowed = resolve_layers(config.layers, num_hidden_layers(model, matched))
    in_layers = [name for name in matched if allowed is None or layer_index(name) in allowed]
    return blocks, [name for name in in_layers if not name.startswith(inside)]


def shared_lora_config(config: CoMoEConfig) -> CoMoEConfig:
    """The config of the plain LoRA that placement='ffn' puts on the other target linears: one expert."""
    return dataclasses.replace(
        config,
        num_experts=1,
        top_k=1,
        routing="topk",
        contrastive_weight=0.0,
        balance_weight=0.0,
        num_negatives=None,
        placement="linear",
        expert_path="dense",
    )


class CoMoEFFNLayer(MixtureLayer):
    """Wraps a gated MLP block (``base_layer``) as a routed mixture of whole-FFN experts: ``router``
    (E, d_model) and ``experts`` (``comoe.ffn_experts.FfnExperts``) hold the adapter's tensors."""

    adapter_layer_names = ("experts", "router")  # PEFT's list: the modules holding the adapter's tensors

    def __init__(
        self,
        base_layer: nn.Module,
        config: CoMoEConfig,
        context: ForwardContext,
        name: str = "",
        adapter_name: str = "default",
    ):
        super().__init__()
        if not is_gated_mlp(base_layer):
            raise TypeError(
                f"cannot make FFN experts of {type(base_layer).__name__}: it supports {SUPPORTED}"
            )
        self.hidden_size = base_layer.gate_proj.in_features
        self.intermediate_size = base_layer.gate_proj.out_features
        self._init_tuner_layer(
            base_layer, config, context, name, adapter_name, self.hidden_size, ffn_block=True
        )
        self.reset_parameters()
        _check_computes_gated_mlp(base_layer, name)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        lead_shape = x.shape[:-1]
        x_flat = x.reshape(-1, self.hidden_size)
        routing = self.route(x_flat)
        tracing = self._tracing()
        output = self.experts(self._expert_call(x_flat, None, routing, tracing))
        if tracing:
            self._leave_trace(routing, output.contrastive, output.samples)
        return output.out.view(*lead_shape, -1).to(x.dtype)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, experts={self.num_experts}, "
            f"top_k={self.top_k}, r={self.r}, routing={self.config.routing}"
        )


@torch.no_grad()
def _check_computes_gated_mlp(mlp: nn.Module, name: str) -> None:
    """Refuse an MLP whose own forward is not down(act(gate(x)) * up(x)): FFN experts would change it.

    Checked on two random tokens; skipped for weights on the meta device (nothing to compute with)."""
    weight = mlp.gate_proj.weight
    if weight.is_meta:
        return
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    probe = torch.randn(2, mlp.gate_proj.in_features, generator=torch.Generator().manual_seed(0))
    probe = probe.to(device=weight.device, dtype=dtype)
    expected = mlp.down_proj(mlp.act_fn(mlp.gate_proj(probe)) * mlp.up_proj(probe))
    actual = mlp(probe)
    if actual.shape != expected.shape or not torch.allclose(
        actual.float(), expected.float(), atol=1e-3, rtol=1e-3
    ):
        raise ValueError(
            f"placement='ffn' cannot make experts of {name or type(mlp).__name__} ({type(mlp).__name__}): it has "
            f"gate/up/down projections but its forward computes something else. It supports {SUPPORTED}; use "
            "placement='linear'"
        )
