"""Run a function without keeping its intermediates for backward: they are recomputed there.

``upcast_linear`` is the one-op case: a float32 product of a bf16 input that keeps the bf16 input, not its
float32 copy (the router's logits under mixed precision).

Like reentrant activation checkpointing, but for one pure function of explicit tensor inputs: only the
inputs are kept (by ``save_for_backward``, so saved-tensor hooks see them), and backward differentiates a
fresh run of the function on detached copies, so no parameter's hooks fire inside backward (DDP-safe).
The function must be deterministic (draw any randomness before, and pass it in). No double backward
(``create_graph=True``): the recompute is differentiated once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F


def recomputed(
    fn: Callable[..., Sequence[Tensor]], *inputs: Tensor | None, differentiable: int = 1
) -> tuple[Tensor, ...]:
    """``fn(*inputs)`` (a tuple of tensors), keeping only ``inputs`` for backward; only its first
    ``differentiable`` outputs carry gradients. Autocast is off inside, in forward and backward: ``fn``
    runs in the dtypes it is given."""
    return _Recomputed.apply(fn, differentiable, *inputs)


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, differentiable, *inputs):  # noqa: D102
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        with torch.no_grad(), _autocast_off(inputs):
            outputs = tuple(fn(*inputs))
        ctx.mark_non_differentiable(*outputs[differentiable:])
        return outputs

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        inputs = [
            t.detach().requires_grad_(needs) if t is not None else None
            for t, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[2:], strict=True)
        ]
        with torch.enable_grad(), _autocast_off(inputs):
            outputs = ctx.fn(*inputs)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad and g is not None]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)
        by_input = dict(zip(map(id, wanted), found, strict=True))
        return (None, None, *(by_input.get(id(t)) for t in inputs))


def _autocast_off(tensors: Sequence[Tensor | None]) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    for device_type in sorted({t.device.type for t in tensors if t is not None}):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


def upcast_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``F.linear(x.to(weight.dtype), weight)`` that keeps ``x`` in its own (narrower) dtype for backward
    and upcasts it again there, instead of keeping the upcast copy (twice its bytes for bf16 → fp32)."""
    if x.dtype == weight.dtype or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        with torch.autocast(x.device.type, enabled=False):  # as the Function: the product in weight's dtype
            return F.linear(x.to(weight.dtype), weight)
    return _UpcastLinear.apply(x, weight)


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):  # noqa: D102
        ctx.save_for_backward(x, weight)
        with _autocast_off([x]):
            return F.linear(x.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        with _autocast_off([x]):
            if ctx.needs_input_grad[0]:
                grad_x = (grad @ weight).to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_weight = grad.flatten(0, -2).t() @ x.flatten(0, -2).to(weight.dtype)
        return grad_x, grad_weight
