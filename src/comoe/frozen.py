"""The frozen base layer an adapter wraps: which layers can be adapted, their sizes, their weight."""

from __future__ import annotations

import torch
from torch import Tensor, nn

try:  # transformers' GPT-2 style linear (weight stored as (in, out))
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

ADAPTABLE_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D != () else (nn.Linear,)


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D != () and isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(
        f"cannot adapt {type(layer).__name__}: only nn.Linear and transformers Conv1D are supported"
    )


def base_weight(layer: nn.Module) -> Tensor:
    """The frozen weight as (d_out, d_in) in fp32, dequantised when bitsandbytes quantised it.

    int8 is dequantised here (CB · SCB / 127): PEFT's helper moves an int8 weight in a way that loses
    bitsandbytes' CPU state for the next forward."""
    from peft.utils.integrations import dequantize_module_weight

    if type(layer.weight).__name__ == "Int8Params" and layer.weight.dtype == torch.int8:
        scales = getattr(layer.weight, "SCB", None)
        if scales is None:  # moved to the layer's state by its first forward
            scales = layer.state.SCB
        return layer.weight.data.float() * scales.float()[:, None] / 127
    weight = layer.weight
    # PEFT's helper only for a quantised weight: it reads names that torch.compile cannot trace
    if type(weight) not in (nn.Parameter, Tensor):
        weight = dequantize_module_weight(layer)
    if Conv1D != () and isinstance(layer, Conv1D):
        weight = weight.t()
    return weight.detach().float()
