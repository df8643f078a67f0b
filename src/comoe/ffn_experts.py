"""Whole-FFN experts (MixLoRA's design): one router per MLP block, expert i the block's frozen FFN with
its own LoRA on gate, up and down.

    FFN_i(x) = W_d,i h_i,   h_i = act(W_g,i x) ⊙ (W_u,i x),   W_p,i = W_p + s B_p,i A_p,i
    y = Σ_{i ∈ top-k(x)} g_i(x) FFN_i(x)

The frozen weights are shared, never copied. The frozen gate and up projections run once per token and
each selected expert adds its LoRA update to them; as the gates sum to 1 and the down projection is
linear, the frozen down projection also runs once, on Σ g_i h_i, and only the down LoRA runs per expert.
So a block costs one frozen FFN plus k experts' activations and LoRA updates, with fixed shapes: one pass
per top-k slot, dense codes as in ``LoraExperts`` (no sort, no host sync). That output is
``comoe.inference.ffn_output``, what an exported model runs; this module adds the contrastive inputs.

The contrastive loss compares E_i(x) = FFN_i(x) − FFN(x), each expert's update of the block's output (as
a LoRA expert's E_i is its update B_i A_i x; the whole FFN_i(x) would be dominated by the shared FFN(x)).
It is materialised for every expert (the nonlinearity leaves no Gram form): E FFN passes per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.experts import ExpertCall, ExpertOutput, Experts, register
from comoe.frozen import base_weight
from comoe.inference import FFN_PROJECTIONS, ffn_output
from comoe.trace import ContrastiveInputs, Samples

PROJECTIONS = FFN_PROJECTIONS


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
        mlp, x, routing = call.base_layer, call.x, call.routing
        x_drop = self.dropout(x.to(self.comoe_gate_A.dtype))
        out = ffn_output(self, mlp, x, x_drop, routing.gates, routing.selected, self.dropout)
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
