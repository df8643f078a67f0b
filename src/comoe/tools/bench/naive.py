"""The naive baseline: a per-expert-loop MoE-LoRA as MoE-PEFT/MixLoRA and MoLA write it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.frozen import layer_features
from comoe.model import CoMoEModel, find_targets
from comoe.utils.modeling import replace_module


# --- the naive baseline ---------------------------------------------------------------------------------
class NaiveExpert(nn.Module):
    """One LoRA expert with its own dropout, as MoE-PEFT's MixLoRA experts hold them."""

    def __init__(self, d_in: int, d_out: int, r: int, dropout: float, device: torch.device | None = None):
        super().__init__()
        self.lora_A = nn.Linear(d_in, r, bias=False, device=device)
        self.lora_B = nn.Linear(r, d_out, bias=False, device=device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=5**0.5)
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora_B(self.lora_A(self.dropout(x)))


class NaiveMoELoRALinear(nn.Module):
    """Top-k MoE-LoRA the way the research repos write it (MoE-PEFT/MixLoRA, MoLA; Mixtral's loop).

    A router ``nn.Linear``, a ``ModuleList`` of experts, and a Python loop over experts: for each expert,
    ``torch.where`` on the one-hot routing mask finds its tokens (a host sync), ``index_select`` gathers
    them, the expert runs on them and ``index_add_`` scatters the gated result back. Computes the same
    function as ``CoMoELayer`` (checked by ``parity_check``), except that each expert draws its own
    dropout mask.
    """

    def __init__(self, base_layer: nn.Module, config: CoMoEConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = layer_features(base_layer)
        self.num_experts, self.top_k, self.r = config.num_experts, config.top_k, config.r
        self.scaling = config.scaling
        device = base_layer.weight.device
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, device=device)
        nn.init.normal_(self.router.weight, std=config.router_init_std)
        self.experts = nn.ModuleList(
            NaiveExpert(self.in_features, self.out_features, config.r, config.lora_dropout, device)
            for _ in range(self.num_experts)
        )

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        flat = x.reshape(-1, self.in_features).to(self.router.weight.dtype)
        probs = F.softmax(self.router(flat), dim=-1)
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        expert_mask = F.one_hot(top_i, self.num_experts).permute(2, 1, 0)  # (E, k, N)
        delta = torch.zeros(flat.shape[0], self.out_features, dtype=flat.dtype, device=flat.device)
        for e, expert in enumerate(self.experts):
            slot, token = torch.where(expert_mask[e])
            if token.numel() == 0:
                continue
            picked = flat.index_select(0, token)
            out = expert(picked) * (top_w[token, slot, None] * self.scaling)
            delta.index_add_(0, token, out.to(delta.dtype))  # bf16 under autocast
        return result + delta.view(*x.shape[:-1], self.out_features).to(result.dtype)


def inject_naive(model: nn.Module, config: CoMoEConfig) -> dict[str, NaiveMoELoRALinear]:
    """Freeze ``model`` and replace each module ``config`` targets by a ``NaiveMoELoRALinear``."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = {}
    for name in find_targets(model, config):
        layer = NaiveMoELoRALinear(model.get_submodule(name), config)
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


@torch.no_grad()
def copy_comoe_to_naive(ours: CoMoEModel, naive_layers: dict[str, NaiveMoELoRALinear]) -> None:
    """Give the naive layers exactly the experts and routers of ``ours``."""
    for name, layer in ours.adapted_modules.items():
        target = naive_layers[name]
        r = layer.r
        target.router.weight.copy_(layer.router.comoe_router)
        for i, expert in enumerate(target.experts):
            expert.lora_A.weight.copy_(layer.experts.comoe_A[i * r : (i + 1) * r])
            expert.lora_B.weight.copy_(layer.experts.comoe_B[:, i * r : (i + 1) * r])
