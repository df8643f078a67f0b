"""Run a function without keeping its intermediates for backward: they are recomputed there.

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
