"""Whole-FFN experts (MixLoRA's design): one router per MLP block, expert i the block's frozen FFN with
its own LoRA on gate, up and down.

    FFN_i(x) = W_d,i h_i,   h_i = act(W_g,i x) ⊙ (W_u,i x),   W_p,i = W_p + s B_p,i A_p,i
    y = Σ_{i ∈ top-k(x)} g_i(x) FFN_i(x)

The frozen weights are shared, never copied. The frozen gate and up projections run once per token and
each selected expert adds its LoRA update to them; as the gates sum to 1 and the down projection is
linear, the frozen down projection also runs once, on Σ g_i h_i, and only the down LoRA runs per expert.
So a block costs one frozen FFN plus k experts' activations and LoRA updates, with fixed shapes: one pass
per top-k slot, dense codes as in ``LoraExperts`` (no sort, no host sync).

The contrastive loss compares E_i(x) = FFN_i(x) − FFN(x), each expert's update of the block's output (as
a LoRA expert's E_i is its update B_i A_i x; the whole FFN_i(x) would be dominated by the shared FFN(x)).
It is materialised for every expert (the nonlinearity leaves no Gram form): E FFN passes per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.experts import ExpertCall, ExpertOutput, Experts, register
from comoe.frozen import base_weight
from comoe.trace import ContrastiveInputs, Samples

PROJECTIONS = ("gate", "up", "down")


def is_gated_mlp(module: nn.Module) -> bool:
    """Whether ``module`` looks like a gated MLP (gate/up/down linears and an activation)."""
    linears = all(isinstance(getattr(module, f"{p}_proj", None), nn.Linear) for p in PROJECTIONS)
    return linears and callable(getattr(module, "act_fn", None))


@register
class FfnExperts(Experts):
    """E whole-FFN experts of one gated MLP block (the ``ExpertCall``'s ``base_layer``): for p in
    gate/up/down, ``comoe_{p}_A`` (E·r, d_in) and ``comoe_{p}_B`` (d_out, E·r), stacked as LoRA experts'."""

    name = "ffn"

    def __init__(self, base_layer: nn.Module, config: CoMoEConfig):
        super().__init__(base_layer, config)
        device = base_layer.gate_proj.weight.device
        n_codes = self.num_experts * self.r
        for proj in PROJECTIONS:
            linear = getattr(base_layer, f"{proj}_proj")
            a = torch.empty(n_codes, linear.in_features, device=device, dtype=torch.float32)
            b = torch.zeros(linear.out_features, n_codes, device=device, dtype=torch.float32)
            self.register_parameter(f"comoe_{proj}_A", nn.Parameter(a))
            self.register_parameter(f"comoe_{proj}_B", nn.Parameter(b))

    @torch.no_grad()
    def reset_parameters(self, base_layer: nn.Module) -> None:
        """LoRA init per expert and projection (A: Kaiming-uniform, B: 0)."""
        for proj in PROJECTIONS:
            a = getattr(self, f"comoe_{proj}_A")
            for a_expert in a.view(self.num_experts, self.r, -1):
                nn.init.kaiming_uniform_(a_expert, a=math.sqrt(5))
            getattr(self, f"comoe_{proj}_B").zero_()

    def forward(self, call: ExpertCall) -> ExpertOutput:
        """The block's output (N, d_model) in the adapter's dtype, from the block input ``call.x``."""
        mlp, x, gates = call.base_layer, call.x, call.routing.gates
        selected = call.routing.selected
        slots = selected if selected is not None else _every_expert(gates)
        dtype = self.comoe_gate_A.dtype
        x_drop = self.dropout(x.to(dtype))
        gate_base = mlp.gate_proj(x).to(dtype)  # the frozen projections, once per token
        up_base = mlp.up_proj(x).to(dtype)
        gate_codes = x_drop @ self.comoe_gate_A.t()  # (N, E·r): every expert's code
        up_codes = x_drop @ self.comoe_up_A.t()
        mixed = torch.zeros_like(gate_base)  # Σ_i g_i h_i
        down_codes = torch.zeros_like(gate_codes)  # Σ_i g_i A_down,i h̃_i, in expert i's slot
        for slot in range(slots.shape[1]):
            expert = slots[:, slot]
            select = F.one_hot(expert, self.num_experts).to(dtype)[:, :, None]  # (N, E, 1)
            weight = gates.gather(1, expert[:, None]).to(dtype)  # (N, 1)
            gate = self._with_update("gate", gate_base, gate_codes, select)
            hidden = mlp.act_fn(gate) * self._with_update("up", up_base, up_codes, select)
            mixed = mixed + weight * hidden
            codes = (self.dropout(hidden) @ self.comoe_down_A.t()).view(-1, self.num_experts, self.r)
            down_codes = down_codes + (codes * select * weight[:, :, None]).view_as(down_codes)
        out = mlp.down_proj(mixed.to(x.dtype)).to(dtype) + self.scaling * (down_codes @ self.comoe_down_B.t())
        contrastive = self._contrastive_inputs(mlp, x, x_drop) if call.contrastive else None
        samples = None
        if call.record_contrastive or call.sample_idx is not None:
            with torch.no_grad():
                if contrastive is None and call.record_contrastive:
                    contrastive = self._contrastive_inputs(mlp, x, x_drop).compact(call.norm_eps)
                idx = call.sample_idx
                if idx is not None:
                    if contrastive is not None and contrastive.outputs is not None:
                        outputs = contrastive.outputs[idx]
                    else:
                        outputs = self._outputs(mlp, x[idx], x_drop[idx])
                    samples = Samples(idx, outputs.detach().float())
        return ExpertOutput(out, contrastive, samples)

    def _contrastive_inputs(self, mlp: nn.Module, x: Tensor, x_drop: Tensor) -> ContrastiveInputs:
        """Every expert's output update (materialised: the nonlinearity leaves no Gram form)."""
        return ContrastiveInputs(outputs=self._outputs(mlp, x, x_drop))

    def _outputs(self, mlp: nn.Module, x: Tensor, x_drop: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):  # the loss is fp32 under autocast too
            return self.expert_outputs(mlp, x, x_drop)

    def _with_update(self, proj: str, base_out: Tensor, codes: Tensor, select: Tensor) -> Tensor:
        """W_p x + s B_p,i A_p,i x̃ for the expert i that ``select`` (N, E, 1) picks for each token."""
        n_tokens = base_out.shape[0]
        picked = (codes.view(n_tokens, self.num_experts, -1) * select).view(n_tokens, -1)
        return base_out + self.scaling * (picked @ getattr(self, f"comoe_{proj}_B").t())

    def expert_outputs(self, mlp: nn.Module, x: Tensor, x_drop: Tensor) -> Tensor:
        """E_i(x) = FFN_i(x) − FFN(x) for every expert i, (N, E, d_model): the frozen projections of ``mlp``
        see the block input x (N, d_model), the LoRA A's its dropped-out copy x̃, as in the forward.

        The down LoRA sees h_i without dropout, and the frozen gate and up run again here (cheaper to
        recompute than to keep for every forward)."""
        n_tokens, n_exp = x_drop.shape[0], self.num_experts
        gate_base = mlp.gate_proj(x).to(x_drop.dtype)
        up_base = mlp.up_proj(x).to(x_drop.dtype)

        def per_expert(proj: str, base_out: Tensor) -> Tensor:  # (E, N, d_ff): W_p x + s B_p,i A_p,i x
            codes = (x_drop @ getattr(self, f"comoe_{proj}_A").t()).view(n_tokens, n_exp, self.r)
            return base_out + self.scaling * torch.bmm(codes.transpose(0, 1), self._stacked_B(proj))

        # expert-major (E, N, ·) layout throughout: every product is one plain bmm or mm
        hidden = mlp.act_fn(per_expert("gate", gate_base)) * per_expert("up", up_base)
        shared = mlp.act_fn(gate_base) * up_base  # the frozen FFN's hidden state
        down_w = base_weight(mlp.down_proj).to(x_drop.dtype)
        down_a = self.comoe_down_A.view(n_exp, self.r, -1).transpose(1, 2)  # (E, d_ff, r)
        lora = self.scaling * torch.bmm(torch.bmm(hidden, down_a), self._stacked_B("down"))
        return ((hidden - shared) @ down_w.t() + lora).transpose(0, 1)  # (N, E, d_model)

    def _stacked_B(self, proj: str) -> Tensor:
        """comoe_{proj}_B as one (r, d_out) matrix per expert: (E, r, d_out)."""
        b = getattr(self, f"comoe_{proj}_B")
        return b.view(b.shape[0], self.num_experts, self.r).permute(1, 2, 0)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, projections={PROJECTIONS}"


def _every_expert(gates: Tensor) -> Tensor:
    """(N, E) expert ids 0..E-1 for every token: the slots of soft routing."""
    n_tokens, n_exp = gates.shape
    return torch.arange(n_exp, device=gates.device).expand(n_tokens, n_exp)
