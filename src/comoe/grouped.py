"""The grouped expert path: tokens sorted by expert, each (token, selected expert) pair doing only its own
expert's work through ``grouped_mm``. Exact, like the dense path; its sort, gathers and scatter cost more
than the FLOPs it saves wherever measured (CPU and H200), so it is chosen only by ``expert_path="grouped"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from comoe.dense import product_dtype


def grouped_delta(
    x_drop: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    selected: Tensor,
    gates: Tensor,
    codes: Tensor | None,
    num_experts: int,
) -> Tensor:
    """Σ over each token's selected experts of g_i B_i A_i x̃, (N, d_out), without the scaling.

    x_drop (N, d_in); lora_A (E·r, d_in); lora_B (d_out, E·r); selected (N, k); gates (N, E), zero where a
    slot holds no selected expert; codes (N, E·r) when already computed. Under autocast the products run in
    its dtype, as the dense path's do (``grouped_mm`` is not on autocast's lists: left alone it would run in
    float32)."""
    n_tokens, d_in = x_drop.shape
    d_out, rank = lora_B.shape[0], lora_A.shape[0] // num_experts
    dtype = product_dtype(x_drop)
    x_drop, lora_A, lora_B = x_drop.to(dtype), lora_A.to(dtype), lora_B.to(dtype)
    flat_expert = selected.reshape(-1)
    order = flat_expert.argsort(stable=True)
    sorted_expert = flat_expert[order]
    token_of = order // selected.shape[1]
    offsets = torch.bincount(flat_expert, minlength=num_experts).cumsum(0).to(torch.int32)
    if codes is not None:  # already computed for the contrastive loss
        sorted_codes = codes.view(n_tokens, num_experts, rank)[token_of, sorted_expert].to(dtype)
    else:
        a_t = lora_A.view(num_experts, rank, d_in).transpose(1, 2)  # (E, d_in, r)
        sorted_codes = grouped_matmul(x_drop[token_of], a_t, offsets)
    sorted_gates = gates[token_of, sorted_expert].to(sorted_codes.dtype)
    b_t = lora_B.view(d_out, num_experts, rank).permute(1, 2, 0)  # (E, r, d_out)
    sorted_out = grouped_matmul(sorted_codes * sorted_gates[:, None], b_t, offsets)
    delta = torch.zeros(n_tokens, d_out, dtype=sorted_out.dtype, device=sorted_out.device)
    return delta.index_add(0, token_of, sorted_out)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()


_GROUPED_MM = getattr(F, "grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _grouped_mm_supported(x: Tensor, weights: Tensor) -> bool:
    """Whether ``grouped_mm`` accepts these operands: its kernels need fp32/bf16/fp16 and rows (K and N)
    that are multiples of 16 bytes; it raises otherwise (e.g. r = 2 in fp32, or float64)."""
    if _GROUPED_MM is None or x.dtype != weights.dtype or x.dtype not in _GROUPED_MM_DTYPES:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False  # its meta kernel (used for tracing) accepts bf16 only
    size = x.element_size()
    k, n = weights.shape[-2:]
    return (k * size) % 16 == 0 and (n * size) % 16 == 0


def grouped_matmul(x: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """Rows x[offsets[e-1]:offsets[e]] @ weights[e] for each group e. x: (M, K), weights: (E, K, N)."""
    if _grouped_mm_supported(x, weights):
        out = _GROUPED_MM(x.contiguous(), weights.contiguous(), offs=offsets)
        return _ContiguousGrad.apply(out)
    # no host sync in a graph: every expert's product over all rows, each masked to its group's rows (E× the
    # FLOPs: where grouped_mm is missing, a compiled grouped path costs more than the dense path)
    if torch.compiler.is_compiling():
        group = torch.searchsorted(
            offsets, torch.arange(x.shape[0], device=x.device, dtype=offsets.dtype), right=True
        )
        return sum((x @ w) * (group == e).unsqueeze(1).to(x.dtype) for e, w in enumerate(weights))
    bounds = [0, *offsets.tolist()]  # fallback (no grouped_mm, or shapes/dtypes it rejects): one host sync
    return torch.cat([x[lo:hi] @ w for lo, hi, w in zip(bounds[:-1], bounds[1:], weights, strict=True)])
