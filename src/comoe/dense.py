"""The dense-codes expert path as one autograd node.

    codes = x̃ A_catᵀ,   delta = s · ((codes ⊙ gates per expert) B_catᵀ),   x̃ = dropout(x)

Written as plain ops, autograd would keep x̃, the codes and the gated codes for backward, each an
N × (E·r) or N × d_in tensor per adapted module (at hidden 64 with E·r = 64 the gated codes alone are as
large as the hidden states). This node keeps x (which the router, when there is one, keeps too), the
dropout mask as bools, the codes and the gates, and recomputes x̃ and the gated codes in backward
(elementwise, no matmul).
The codes are a second output so that the contrastive loss shares the saved tensor.

Under autocast the products run in the autocast dtype, as the plain ops would (x̃ formed in the input's dtype
and then cast; bf16 codes and delta under bf16 mixed precision; float64 is never cast); gradients come
back in each input's own dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from comoe.inference import dense_experts_added, lora_delta, product_dtype
from comoe.inference import gated_codes as _gated

__all__ = [
    "apply_keep",
    "dense_experts",
    "dense_experts_added",
    "dropout_keep",
    "plain_dense_experts",
    "product_dtype",
]


def dropout_keep(x: Tensor, p: float) -> Tensor:
    """The keep mask of ``nn.Dropout(p)`` as bools; draws from the RNG as ``F.dropout`` does on the CPU."""
    return torch.empty_like(x).bernoulli_(1.0 - p).bool()


def dense_experts(
    x: Tensor,
    keep: Tensor | None,
    keep_scale: float,
    lora_A: Tensor,
    lora_B: Tensor,
    gates: Tensor,
    rank: int,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """(delta (N, d_out), codes (N, E·r)) of the dense path. x (N, d_in); keep: dropout's keep mask or None,
    keep_scale 1/(1−p); lora_A (E·r, d_in); lora_B (d_out, E·r); gates (N, E), zero for unselected experts.

    Without autograd (generation, evaluation) and under torch.compile (which plans what to keep itself) it
    runs as the plain ops, with the same dropout mask: the node's own overhead is paid only where it saves.
    """
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return plain_dense_experts(x, keep, keep_scale, lora_A, lora_B, gates, rank, scaling)
    dtype = product_dtype(lora_A)
    return _DenseExperts.apply(x, keep, keep_scale, lora_A, lora_B, gates, rank, scaling, dtype)


def plain_dense_experts(
    x: Tensor,
    keep: Tensor | None,
    keep_scale: float,
    lora_A: Tensor,
    lora_B: Tensor,
    gates: Tensor,
    rank: int,
    scaling: float,
) -> tuple[Tensor, Tensor]:
    """``dense_experts`` as plain ops (autograd keeps x̃ and the gated codes when it records them): the
    inference path's ``comoe.inference.lora_delta`` on the dropped-out input."""
    return lora_delta(apply_keep(x, keep, keep_scale), lora_A, lora_B, gates, rank, scaling)


class _DenseExperts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, keep_scale, lora_A, lora_B, gates, rank, scaling, dtype):  # noqa: D102
        with torch.autocast(x.device.type, enabled=False):
            x_drop = apply_keep(x, keep, keep_scale).to(dtype)
            codes = x_drop @ lora_A.to(dtype).t()
            delta = _gated(codes, gates, rank) @ lora_B.to(dtype).t()
            if scaling != 1.0:
                delta = delta * scaling
        ctx.save_for_backward(x, keep, lora_A, lora_B, gates, codes)
        ctx.keep_scale, ctx.rank, ctx.scaling, ctx.dtype = keep_scale, rank, scaling, dtype
        ctx.set_materialize_grads(False)
        return delta, codes

    @staticmethod
    def backward(ctx, grad_delta, grad_codes_out):  # noqa: D102
        x, keep, lora_A, lora_B, gates, codes = ctx.saved_tensors
        rank, dtype = ctx.rank, ctx.dtype
        n_tokens, width = codes.shape
        grad_x = grad_a = grad_b = grad_gates = None
        grad_codes = grad_codes_out
        with torch.autocast(x.device.type, enabled=False):
            if grad_delta is not None:
                grad_delta = grad_delta.to(dtype)
                if ctx.scaling != 1.0:
                    grad_delta = grad_delta * ctx.scaling
                grad_gated = (grad_delta @ lora_B.to(dtype)).view(n_tokens, -1, rank)  # (N, E, r)
                if ctx.needs_input_grad[5]:
                    grad_gates = (grad_gated * codes.view_as(grad_gated)).sum(-1).to(gates.dtype)
                if ctx.needs_input_grad[4]:
                    grad_b = (grad_delta.t() @ _gated(codes, gates, rank)).to(lora_B.dtype)
                from_delta = (grad_gated * gates.to(dtype)[..., None]).view(n_tokens, width)
                grad_codes = from_delta if grad_codes is None else from_delta + grad_codes.to(dtype)
            if grad_codes is not None:
                grad_codes = grad_codes.to(dtype)
                if ctx.needs_input_grad[3]:
                    x_drop = apply_keep(x, keep, ctx.keep_scale).to(dtype)
                    grad_a = (grad_codes.t() @ x_drop).to(lora_A.dtype)
                if ctx.needs_input_grad[0]:
                    grad_x = apply_keep((grad_codes @ lora_A.to(dtype)).to(x.dtype), keep, ctx.keep_scale)
        return grad_x, None, None, grad_a, grad_b, grad_gates, None, None, None


def apply_keep(x: Tensor, keep: Tensor | None, keep_scale: float) -> Tensor:
    """Dropout with a given keep mask: x · keep / (1 − p), in x's dtype with the scale applied as a float32
    product (a bf16 x gives what the fp32 product cast to bf16 gives; ``F.dropout`` on a bf16 CPU tensor
    rounds 1/(1 − p) to bf16 first). The bools are read as uint8 (the same bytes): a
    float × bool product takes a slow path on the CPU (8× the time of float × uint8 at 128 × 576)."""
    if keep is None:
        return x
    return x * keep.view(torch.uint8) * keep_scale
