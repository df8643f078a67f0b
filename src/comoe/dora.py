"""DoRA experts: expert i also learns a magnitude m_i per output feature and contributes its DoRA update
c_i ⊙ (W0 + s B_i A_i) x̃ − W0 x̃, where c_i = m_i / ||W0 + s B_i A_i|| (row norms, held constant in
backward as DoRA prescribes), so

    y = W0 x + Σ_i g_i(x) [ s c_i ⊙ B_i A_i x̃ + (c_i − 1) ⊙ W0 x̃ ],   x̃ = dropout(x).

The c_i fold into B (one elementwise scale) and the second term is one (N, E) @ (E, d_out) product, so
both expert paths keep their shape; the row norms come from rank-r products, never an E × d_out × d_in
tensor. The scales, the row norms and the update are computed by ``comoe.inference`` (what an exported
model runs); this module adds what training and the records need.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from comoe.inference import dora_row_norms, dora_scale, scaled_B

__all__ = ["DoraState", "dora_row_norms", "dora_scale", "expert_outputs", "scaled_B"]


class DoraState(NamedTuple):
    """What one call of DoRA experts adds beside the codes: their scales and the base output."""

    scale: Tensor  # (E, d_out): c_i = m_i / ||W0 + s B_i A_i||
    base_out: Tensor  # (N, d_out): W0 x̃ without bias


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
