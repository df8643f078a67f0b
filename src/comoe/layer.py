"""The adapted linear: a frozen base layer plus a routed mixture of LoRA experts.

    y = W0 x + (α/r) Σ_i g_i(x) B_i A_i dropout(x)

The E experts are stored stacked (``comoe_A``: (E·r, d_in), ``comoe_B``: (d_out, E·r)) so that the
default "dense codes" forward computes every expert's rank-r code in one matmul, zeroes the codes of
unselected experts through the gates and applies all B's in a second matmul: a fixed number of ops, no
data-dependent shapes, no host syncs (``comoe.dense``). It does E/k times the FLOPs of a sparse path; the
"grouped" path (``comoe.grouped``) does only the selected work but was slower wherever measured, so
``auto`` is dense. Both are exact. DoRA experts (``use_dora``) are described in ``comoe.dora``.

What the contrastive loss needs from the experts' weights (the Gram matrix BᵀB, or DoRA's materialised
expert outputs) is formed here, inside the forward, and left in the call's ``LayerTrace``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.dense import (
    apply_keep,
    dense_experts,
    dense_experts_added,
    dropout_keep,
    plain_dense_experts,
    product_dtype,
)
from comoe.dora import DoraState, dora_row_norms, expert_outputs, scaled_B
from comoe.frozen import base_weight, layer_features
from comoe.grouped import grouped_delta
from comoe.mixture import MixtureLayer
from comoe.routers import Routing
from comoe.trace import ContrastiveInputs, ForwardContext, Samples
from comoe.utils.deprecation import moved_names


class CoMoELayer(MixtureLayer):
    """Wraps ``base_layer``; parameters whose names start with ``comoe_`` are the adapter.

    As a PEFT tuner layer it holds a single adapter (its parameters are not keyed by adapter name, so saved
    tensor names are the same as before comoe was a PEFT method); ``set_adapter`` accepts that one name.
    A single expert (``num_experts=1``) is plain LoRA (or DoRA): no router.
    """

    adapter_layer_names = ("comoe_A", "comoe_B", "comoe_router", "comoe_magnitude")  # PEFT's list

    def __init__(
        self,
        base_layer: nn.Module,
        config: CoMoEConfig,
        context: ForwardContext,
        name: str = "",
        adapter_name: str = "default",
    ):
        super().__init__()
        self._init_tuner_layer(base_layer, config, context, name, adapter_name)
        self.in_features, self.out_features = layer_features(base_layer)
        device = base_layer.weight.device
        n_codes = self.num_experts * self.r
        # Adapter weights are kept in fp32 whatever the base dtype (as PEFT does), the router always.
        self.comoe_A = nn.Parameter(
            torch.empty(n_codes, self.in_features, device=device, dtype=torch.float32)
        )
        self.comoe_B = nn.Parameter(
            torch.zeros(self.out_features, n_codes, device=device, dtype=torch.float32)
        )
        self._make_router(self.in_features, device)
        magnitude = torch.empty(self.num_experts, self.out_features, device=device, dtype=torch.float32)
        self.register_parameter("comoe_magnitude", nn.Parameter(magnitude) if config.use_dora else None)
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self._path = "dense" if self.uses_every_expert else config.expert_path
        self.reset_parameters()

    def adapter_parameters(self) -> list[nn.Parameter]:
        optional = [p for p in (self.comoe_router, self.comoe_magnitude) if p is not None]
        return [self.comoe_A, self.comoe_B, *optional]

    @property
    def expert_path(self) -> str:
        """The path the next forward takes. ``auto`` is the dense path: the grouped path was slower in every
        setting measured (BENCHMARKS.md: the CPU from hidden 64 to 1024; an H200 with LLaMA-2-7B-shaped
        layers, bf16 autocast, E up to 64, r up to 64, 2,048 to 8,192 tokens). It stays selectable."""
        return "dense" if self._path == "auto" else self._path

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """LoRA init per expert (A: Kaiming-uniform, B: 0); router: small normal; DoRA magnitudes: the base
        weight's row norms, so that every expert starts as the identity update."""
        for a_expert in self.comoe_A.view(self.num_experts, self.r, self.in_features):
            nn.init.kaiming_uniform_(a_expert, a=math.sqrt(5))
        self.comoe_B.zero_()
        if self.comoe_router is not None:
            nn.init.normal_(self.comoe_router, std=self.config.router_init_std)
        if self.comoe_magnitude is not None:
            self.comoe_magnitude.copy_(
                base_weight(self.base_layer).norm(dim=1).expand_as(self.comoe_magnitude)
            )

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        lead_shape = x.shape[:-1]
        x_flat = adapter_input(x.reshape(-1, self.in_features), self.comoe_A.dtype)
        routing = self.route(x_flat)
        gates = routing.gates
        if self._plain_inference(result, x_flat):  # generation, evaluation
            out = result.reshape(-1, self.out_features)
            out = dense_experts_added(out, x_flat, self.comoe_A, self.comoe_B, gates, self.r, self.scaling)
            return out.view(*lead_shape, self.out_features)
        with_contrastive = self._contrastive_in_training()  # the codes then carry the loss's gradient
        codes = None
        path = self.expert_path
        scale = self.dora_scale()  # (E, d_out) for DoRA experts, else None
        lora_B = self.comoe_B if scale is None else scaled_B(self.comoe_B, scale, self.num_experts)
        if path == "dense" and scale is None:  # one autograd node: keeps neither x̃ nor the gated codes
            keep, x_drop = self._dropout_keep(x_flat), None
            delta, codes = dense_experts(
                x_flat, keep, self._keep_scale, self.comoe_A, lora_B, gates, self.r, self.scaling
            )
        else:
            x_drop = apply_keep(x_flat, self._dropout_keep(x_flat), self._keep_scale)  # as the node forms it
            if path == "dense":  # DoRA experts: their update needs W0 x̃ too, so x̃ is formed here
                delta, codes = plain_dense_experts(
                    x_drop, None, 1.0, self.comoe_A, lora_B, gates, self.r, self.scaling
                )
            else:
                if with_contrastive:
                    codes = x_drop @ self.comoe_A.t()
                delta = grouped_delta(
                    x_drop, self.comoe_A, lora_B, routing.selected, gates, codes, self.num_experts
                )
                delta = delta * self.scaling
        dora = None
        if scale is not None:
            base_out = self._base_output(result, x_drop)
            delta = delta + (gates.to(scale.dtype) @ (scale - 1)) * base_out
            dora = DoraState(scale, base_out)
        contrastive = self._contrastive_inputs(codes, dora) if with_contrastive else None
        if self._wants_aux() and not self._recomputing():
            self._trace(routing, x_drop, codes, dora, contrastive)
        return result + delta.view(*lead_shape, self.out_features).to(result.dtype)

    def _trace(
        self,
        routing: Routing,
        x_drop: Tensor | None,
        codes: Tensor | None,
        dora: DoraState | None,
        contrastive: ContrastiveInputs | None,
    ) -> None:
        """Leave this call's trace, forming without autograd what only an evaluation or a record needs: the
        contrastive inputs (their cosines, not the materialised outputs) and the sampled tokens' outputs."""
        idx = self._sample_tokens(routing.gates.shape[0])
        recording = self._wants_contrastive_record()
        with torch.no_grad():
            if codes is None and (recording or idx is not None):
                codes = x_drop @ self.comoe_A.t()  # the grouped path skips them; nothing saved for backward
            if contrastive is None and recording:
                contrastive = self._contrastive_inputs(codes, dora).compact(self.config.norm_eps)
            samples = None
            if idx is not None:
                picked = None if dora is None else DoraState(dora.scale.detach(), dora.base_out[idx].detach())
                sampled = codes[idx].detach().view(idx.numel(), self.num_experts, self.r).float()
                samples = Samples(idx, self.expert_outputs(sampled, picked).float())
        self._leave_trace(routing, contrastive, samples)

    def _contrastive_inputs(self, codes: Tensor, dora: DoraState | None) -> ContrastiveInputs:
        """What the contrastive loss needs from this call, formed while the weights are whole: the codes
        and G = BᵀB (Gram form), or every expert's output (DoRA experts, the materialised form). fp32 (fp64
        if the adapter is) whatever the autocast."""
        n_tokens = codes.shape[0]
        codes = codes.view(n_tokens, self.num_experts, self.r)
        with torch.autocast(codes.device.type, enabled=False):
            if self.config.contrastive_form == "gram" and dora is None:
                lora_B = self.comoe_B.to(torch.promote_types(self.comoe_B.dtype, torch.float32))
                recompute = 4 * self.num_experts * self.r >= self.in_features
                return ContrastiveInputs(codes=codes, gram=lora_B.t() @ lora_B, recompute=recompute)
            return ContrastiveInputs(outputs=self.expert_outputs(codes, dora))

    def expert_outputs(self, codes: Tensor, dora: DoraState | None = None) -> Tensor:
        """Every expert's output E_i(x) (N, E, d_out) from the codes (N, E, r): see ``comoe.dora``."""
        return expert_outputs(codes, self.comoe_B, self.scaling, dora)

    def _plain_inference(self, result: Tensor, x: Tensor) -> bool:
        """Whether this call only adds the experts' update: no autograd, no dropout, no DoRA, nothing recorded,
        the dense path, and the base output already in the dtype the products run in (addmm keeps it)."""
        return (
            not torch.is_grad_enabled()
            and not self.training
            and self.comoe_magnitude is None
            and self.expert_path == "dense"
            and not self._wants_aux()
            and result.dtype == product_dtype(x)  # the dtype addmm computes in: the output's unchanged
            and not torch.compiler.is_compiling()
        )

    def _dropout_keep(self, x: Tensor) -> Tensor | None:
        """This call's dropout keep mask (bools), or None when dropout is off."""
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return None
        return dropout_keep(x, self.dropout.p)

    @property
    def _keep_scale(self) -> float:
        return 1.0 if isinstance(self.dropout, nn.Identity) else 1.0 / (1.0 - self.dropout.p)

    # --- DoRA experts ----------------------------------------------------------------------------
    def dora_scale(self) -> Tensor | None:
        """c_i = m_i / ||W0 + s B_i A_i|| per expert and output feature, (E, d_out); None for LoRA experts.

        The norm is computed without autograd: DoRA (§4.3) treats it as a constant in backward.
        """
        if self.comoe_magnitude is None:
            return None
        device = self.comoe_A.device.type
        with torch.no_grad(), torch.autocast(device, enabled=False):  # fp32 under bf16 training too
            norms = dora_row_norms(
                base_weight(self.base_layer), self.comoe_A, self.comoe_B, self.scaling, self.num_experts
            )
        return self.comoe_magnitude / norms

    def _base_output(self, result: Tensor, x_drop: Tensor) -> Tensor:
        """W0 x̃ without bias, (N, d_out) in the adapter's dtype: the base output itself when dropout is off."""
        if isinstance(self.dropout, nn.Identity) or not self.training:
            out = result.reshape(-1, self.out_features).to(self.comoe_A.dtype)
            bias = getattr(self.base_layer, "bias", None)
            return out - bias.to(out.dtype) if bias is not None else out
        return F.linear(x_drop, base_weight(self.base_layer).to(x_drop.dtype))

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
            f"r={self.r}, routing={self.config.routing}, path={self.expert_path}"
            + (", dora" if self.comoe_magnitude is not None else "")
        )


def adapter_input(x: Tensor, adapter_dtype: torch.dtype) -> Tensor:
    """``x`` in the dtype the adapter takes it in: the adapter's, except under autocast for an input already
    in autocast's dtype, which stays in it. Every product would cast it there anyway, and the dropped input
    formed in bf16 equals the one formed in fp32 and then cast (one rounding either way): no full-width fp32
    copy is made, and none is kept for backward."""
    autocast = adapter_dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
    return x if autocast and product_dtype(x) == x.dtype else x.to(adapter_dtype)


# names this module held in comoe 0.1 (comoe.utils.deprecation)
__getattr__ = moved_names(
    __name__,
    {
        "ForwardContext": "comoe.trace:ForwardContext",
        "ModuleAux": "comoe.trace:ModuleAux",
        "MixtureLayer": "comoe.mixture:MixtureLayer",
        "MERGE_REFUSED": "comoe.mixture:MERGE_REFUSED",
        "ONE_ADAPTER": "comoe.mixture:ONE_ADAPTER",
        "base_weight": "comoe.frozen:base_weight",
        "layer_features": "comoe.frozen:layer_features",
        "ADAPTABLE_TYPES": "comoe.frozen:ADAPTABLE_TYPES",
        "Conv1D": "comoe.frozen:Conv1D",
        "dora_row_norms": "comoe.dora:dora_row_norms",
        "grouped_matmul": "comoe.grouped:grouped_matmul",
    },
)
