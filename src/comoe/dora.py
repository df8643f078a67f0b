"""DoRA experts: expert i also learns a magnitude m_i per output feature and contributes its DoRA update
c_i ⊙ (W0 + s B_i A_i) x̃ − W0 x̃, where c_i = m_i / ||W0 + s B_i A_i|| (row norms, held constant in
backward as DoRA prescribes), so

    y = W0 x + Σ_i g_i(x) [ s c_i ⊙ B_i A_i x̃ + (c_i − 1) ⊙ W0 x̃ ],   x̃ = dropout(x).

The c_i fold into B (one elementwise scale) and the second term is one (N, E) @ (E, d_out) product, so
both expert paths keep their shape; the row norms come from rank-r products, never an E × d_out × d_in
tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class DoraState(NamedTuple):
    """What one call of DoRA experts adds beside the codes: their scales and the base output."""

    scale: Tensor  # (E, d_out): c_i = m_i / ||W0 + s B_i A_i||
    base_out: Tensor  # (N, d_out): W0 x̃ without bias


def dora_row_norms(
    weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float, num_experts: int
) -> Tensor:
    """||W0 + s B_i A_i|| per output row for every expert i, (E, d_out), from rank-r products only.

    Row j: ||w_j||² + 2s b_ijᵀ (A_i w_j) + s² b_ijᵀ (A_i A_iᵀ) b_ij. weight (d_out, d_in); lora_A (E·r, d_in);
    lora_B (d_out, E·r).
    """

    d_out, d_in = weight.shape
    rank = lora_A.shape[0] // num_experts
    a = lora_A.to(weight.dtype).view(num_experts, rank, d_in)
    b = lora_B.to(weight.dtype).view(d_out, num_experts, rank)
    projected = (weight @ lora_A.to(weight.dtype).t()).view(d_out, num_experts, rank)  # A_i w_j
    gram = a @ a.transpose(1, 2)  # (E, r, r)
    cross = (b * projected).sum(-1)  # (d_out, E)
    quadratic = torch.einsum("der,ers,des->de", b, gram, b)
    squared = weight.pow(2).sum(1, keepdim=True) + 2 * scaling * cross + scaling**2 * quadratic
    return squared.clamp_min(0).sqrt().t()


def scaled_B(lora_B: Tensor, scale: Tensor, num_experts: int) -> Tensor:
    """B with expert i's columns scaled per output feature by c_i (scale (E, d_out)): (d_out, E·r)."""
    d_out = lora_B.shape[0]
    b = lora_B.view(d_out, num_experts, -1)
    return (b * scale.t()[:, :, None]).view(d_out, -1)


def expert_outputs(codes: Tensor, lora_B: Tensor, scaling: float, dora: DoraState | None = None) -> Tensor:
    """Every expert's output E_i(x), (N, E, d_out), from its codes (N, E, r).

    LoRA experts: B_i h_i (the scaling s left out: cosines do not see it). DoRA experts (``dora``):
    s c_i ⊙ B_i h_i + (c_i − 1) ⊙ W0 x̃, the expert's whole update.
    """

    n_exp, rank = codes.shape[1], codes.shape[2]
    b = lora_B.view(lora_B.shape[0], n_exp, rank)
    lora = torch.einsum("ner,der->ned", codes.to(b.dtype), b)  # codes are bf16 under autocast
    if dora is None:
        return lora
    return lora * (scaling * dora.scale) + (dora.scale - 1) * dora.base_out[:, None, :]
