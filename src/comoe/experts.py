"""Expert kinds: the modules that hold a layer's expert tensors and compute with them.

An expert kind is a module from the ``EXPERT_KINDS`` registry: LoRA experts and DoRA experts on one linear
(here), whole-FFN experts on an MLP block (``comoe.ffn_experts``). The adapted layer (``comoe.mixture``)
routes the tokens and calls its experts once with an ``ExpertCall``; everything that needs the experts'
weights — their update of the output, what the contrastive loss needs (the Gram matrix BᵀB, or DoRA's
materialised outputs), the outputs the routing recorder samples — is formed in that forward, while the
weights are whole (under FSDP the module holding them is unsharded only during its forward).

LoRA experts store the E experts stacked (``comoe_A``: (E·r, d_in), ``comoe_B``: (d_out, E·r)) so that the
default "dense codes" path computes every expert's rank-r code in one matmul, zeroes the codes of
unselected experts through the gates and applies all B's in a second matmul: a fixed number of ops, no
data-dependent shapes, no host syncs (``comoe.dense``). It does E/k times the FLOPs of a sparse path; the
"grouped" path (``comoe.grouped``) does only the selected work but is slower wherever measured, so
``auto`` is dense. Both are exact. DoRA experts are described in ``comoe.dora``.

Adding an expert kind is one class registered with ``@register`` (its tensors, ``reset_parameters``, a
forward from ``ExpertCall`` to ``ExpertOutput``), and the config field that selects it in ``kind_for``.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.dense import apply_keep, dense_experts, dense_experts_added, dropout_keep, plain_dense_experts
from comoe.dora import DoraState, dora_scale, expert_outputs, scaled_B
from comoe.frozen import base_weight, layer_features
from comoe.fused import dropout_mask, routed_lora, router_dtype, spread_matrix
from comoe.grouped import grouped_delta
from comoe.inference import dora_update, output_without_bias, product_dtype
from comoe.routers import Routing
from comoe.trace import ContrastiveInputs, Samples


class ExpertCall(NamedTuple):
    """What an adapted layer asks of its experts for one call of N tokens."""

    x: Tensor  # (N, d_in): the adapter's input (LoRA/DoRA: in the adapter's dtype; FFN: the block input)
    base_layer: nn.Module  # the frozen module the experts adapt (read inside the layer's forward only)
    base_out: Tensor | None  # (N, d_out): the frozen layer's output (None where the experts run it)
    routing: Routing | None  # None: the experts route the tokens themselves, through ``router``
    path: str = "dense"  # "dense" or "grouped"
    plain: bool = False  # inference: only add the update (no autograd, nothing traced)
    contrastive: bool = False  # form the contrastive inputs with autograd (training)
    record_contrastive: bool = False  # form them without autograd, compact (routing records)
    sample_idx: Tensor | None = None  # the tokens whose expert outputs the recorder keeps
    norm_eps: float = 1e-8  # the cosines' epsilon, for compact contrastive inputs
    router: nn.Module | None = None  # with ``routing`` None: the top-k router whose weight routes the tokens
    probs: str | None = None  # with ``router``: the router's softmax "grad" (differentiable), "plain" or None


class ExpertOutput(NamedTuple):
    """The experts' answer to one ``ExpertCall``."""

    out: Tensor  # (N, d_out): the layer's output, the frozen output plus the experts' update
    contrastive: ContrastiveInputs | None  # None: this call forms no contrastive inputs
    samples: Samples | None  # the sampled tokens' expert outputs, for the recorder
    routing: Routing | None = None  # the routing the experts computed (``ExpertCall.router``)


class Experts(nn.Module):
    """An expert kind: E experts' tensors (fp32 whatever the base dtype, as PEFT keeps adapters), whose
    names start with ``comoe_`` (PEFT's prefix for the method)."""

    name: ClassVar[str]
    supports_plain: ClassVar[bool] = False  # whether it takes ``ExpertCall.plain`` (inference, add only)
    supports_routing: ClassVar[bool] = False  # whether it routes itself (``ExpertCall.router``, training)

    def __init__(self, base_layer: nn.Module, config: CoMoEConfig):
        super().__init__()
        self.num_experts, self.r, self.scaling = config.num_experts, config.r, config.scaling
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()

    def _dropout_keep(self, x: Tensor) -> Tensor | None:
        """This call's dropout keep mask (bools), or None when dropout is off."""
        if isinstance(self.dropout, nn.Identity) or not self.training:
            return None
        return dropout_keep(x, self.dropout.p)

    @property
    def _keep_scale(self) -> float:
        return 1.0 if isinstance(self.dropout, nn.Identity) else 1.0 / (1.0 - self.dropout.p)

    def reset_parameters(self, base_layer: nn.Module) -> None:
        raise NotImplementedError

    def forward(self, call: ExpertCall) -> ExpertOutput:
        raise NotImplementedError


EXPERT_KINDS: dict[str, type[Experts]] = {}


def register(cls: type[Experts]) -> type[Experts]:
    """Class decorator: make ``cls`` an expert kind under its ``name``."""
    EXPERT_KINDS[cls.name] = cls
    return cls


def kind_for(config: CoMoEConfig, ffn_block: bool = False) -> str:
    """The expert kind a layer of ``config`` gets: whole-FFN experts on an MLP block, else DoRA or LoRA."""
    if ffn_block:
        return "ffn"
    return "dora" if config.use_dora else "lora"


def build_experts(base_layer: nn.Module, config: CoMoEConfig, ffn_block: bool = False) -> Experts:
    """The experts of the kind ``kind_for`` names, built around ``base_layer`` (not yet initialised)."""
    return EXPERT_KINDS[kind_for(config, ffn_block)](base_layer, config)


@register
class LoraExperts(Experts):
    """E LoRA experts on one linear: y = W0 x + s Σ_i g_i(x) B_i A_i x̃,  x̃ = dropout(x)."""

    name = "lora"
    supports_plain = True
    supports_routing = True

    def __init__(self, base_layer: nn.Module, config: CoMoEConfig):
        super().__init__(base_layer, config)
        self.in_features, self.out_features = layer_features(base_layer)
        device = base_layer.weight.device
        n_codes = self.num_experts * self.r
        self.comoe_A = nn.Parameter(
            torch.empty(n_codes, self.in_features, device=device, dtype=torch.float32)
        )
        self.comoe_B = nn.Parameter(
            torch.zeros(self.out_features, n_codes, device=device, dtype=torch.float32)
        )
        self.gram_form = config.contrastive_form == "gram"
        self._spreads: dict[
            tuple, tuple[Tensor, Tensor]
        ] = {}  # comoe.fused.spread_matrix, by device and scale

    @torch.no_grad()
    def reset_parameters(self, base_layer: nn.Module) -> None:
        """LoRA init per expert: A Kaiming-uniform, B zero (every expert starts as the identity update)."""
        for a_expert in self.comoe_A.view(self.num_experts, self.r, self.in_features):
            nn.init.kaiming_uniform_(a_expert, a=math.sqrt(5))
        self.comoe_B.zero_()

    def forward(self, call: ExpertCall) -> ExpertOutput:
        if call.routing is None:
            return self._routed(call)
        x, gates = call.x, call.routing.gates
        if call.plain:  # generation, evaluation: addmm onto the base output
            out = dense_experts_added(
                call.base_out, x, self.comoe_A, self.comoe_B, gates, self.r, self.scaling
            )
            return ExpertOutput(out, None, None)
        codes, keep = None, self._dropout_keep(x)
        scale = self.dora_scale(call.base_layer)  # (E, d_out) for DoRA experts, else None
        lora_B = self.comoe_B if scale is None else scaled_B(self.comoe_B, scale, self.num_experts)
        if call.path == "dense" and scale is None:  # one autograd node: keeps neither x̃ nor the gated codes
            x_drop = None
            delta, codes = dense_experts(
                x, keep, self._keep_scale, self.comoe_A, lora_B, gates, self.r, self.scaling
            )
        else:
            x_drop = apply_keep(x, keep, self._keep_scale)  # as the node forms it
            if call.path == "dense":  # DoRA experts: their update needs W0 x̃ too, so x̃ is formed here
                delta, codes = plain_dense_experts(
                    x_drop, None, 1.0, self.comoe_A, lora_B, gates, self.r, self.scaling
                )
            else:
                if call.contrastive:
                    codes = x_drop @ self.comoe_A.t()
                delta = grouped_delta(
                    x_drop, self.comoe_A, lora_B, call.routing.selected, gates, codes, self.num_experts
                )
                delta = delta * self.scaling
        dora = None
        if scale is not None:
            base_out = self._base_output(call, keep, x_drop)
            delta = dora_update(delta, gates, scale, base_out)
            dora = DoraState(scale, base_out)
        contrastive = self._contrastive_inputs(codes, dora) if call.contrastive else None
        samples = None
        if call.record_contrastive or call.sample_idx is not None:
            contrastive, samples = self._records(call, x_drop, codes, dora, contrastive)
        return ExpertOutput(call.base_out + delta.to(call.base_out.dtype), contrastive, samples)

    def _routed(self, call: ExpertCall) -> ExpertOutput:
        """A training forward with the router's work in the same autograd node (``comoe.fused``)."""
        x, router = call.x, call.router
        keep = None
        if not isinstance(self.dropout, nn.Identity) and self.training:
            keep = dropout_mask(x, self.dropout.p)
        keep_scale = self._keep_scale if keep is not None else 1.0
        # dropout's 1/(1 - p) rides on the spread matrix, except where the codes themselves are returned
        folded, keep_scale = (keep_scale, 1.0) if not call.contrastive else (1.0, keep_scale)
        spread, spread_t = self._spread(router_dtype(router.comoe_router), x.device, self.scaling * folded)
        res = routed_lora(
            x,
            call.base_out,
            router.comoe_router,
            self.comoe_A,
            self.comoe_B,
            keep,
            spread,
            spread_t,
            router.top_k,
            keep_scale,
            product_dtype(self.comoe_A),
            call.probs,
            call.contrastive,
        )
        routing = Routing(res.gates, res.probs, res.selected)
        contrastive = samples = None
        if call.contrastive and self.gram_form:
            recompute = 4 * self.num_experts * self.r >= self.in_features
            contrastive = ContrastiveInputs(codes=res.codes, gram=res.gram, recompute=recompute)
        elif call.contrastive:  # the paper's materialised outputs, from the node's codes
            contrastive = self._contrastive_inputs(res.codes, None)
        if call.record_contrastive or call.sample_idx is not None:
            x_drop = None
            if res.codes is None:
                with torch.no_grad():
                    x_drop = x if keep is None else x * keep * self._keep_scale
            contrastive, samples = self._records(
                call._replace(routing=routing), x_drop, res.codes, None, contrastive
            )
        return ExpertOutput(res.out, contrastive, samples, routing)

    def _spread(self, dtype: torch.dtype, device: torch.device, scale: float) -> tuple[Tensor, Tensor]:
        """``spread_matrix`` and its transpose for this layer, made once per device, dtype and scale."""
        key = (device, dtype, scale)
        if key not in self._spreads:
            spread = spread_matrix(self.num_experts, self.r, scale, device, dtype)
            self._spreads[key] = (spread, spread.t().contiguous())
        return self._spreads[key]

    @torch.no_grad()
    def _records(
        self,
        call: ExpertCall,
        x_drop: Tensor | None,
        codes: Tensor | None,
        dora: DoraState | None,
        contrastive: ContrastiveInputs | None,
    ) -> tuple[ContrastiveInputs | None, Samples | None]:
        """What only an evaluation or a record needs, formed without autograd: the contrastive inputs
        (their cosines, not the materialised outputs) and the sampled tokens' outputs."""
        if codes is None:  # the grouped path skips them; nothing is saved for backward
            codes = x_drop @ self.comoe_A.t()
        if contrastive is None and call.record_contrastive:
            contrastive = self._contrastive_inputs(codes, dora).compact(call.norm_eps)
        samples = None
        idx = call.sample_idx
        if idx is not None:
            picked = None if dora is None else DoraState(dora.scale.detach(), dora.base_out[idx].detach())
            sampled = codes[idx].detach().view(idx.numel(), self.num_experts, self.r).float()
            samples = Samples(idx, self.expert_outputs(sampled, picked).float())
        return contrastive, samples

    def _contrastive_inputs(self, codes: Tensor, dora: DoraState | None) -> ContrastiveInputs:
        """What the contrastive loss needs from this call: the codes and G = BᵀB (Gram form), or every
        expert's output (DoRA experts, the materialised form). fp32 (fp64 if the adapter is) whatever the
        autocast."""
        n_tokens = codes.shape[0]
        codes = codes.view(n_tokens, self.num_experts, self.r)
        with torch.autocast(codes.device.type, enabled=False):
            if self.gram_form and dora is None:
                lora_B = self.comoe_B.to(torch.promote_types(self.comoe_B.dtype, torch.float32))
                recompute = 4 * self.num_experts * self.r >= self.in_features
                flat = codes.view(n_tokens, -1)
                return ContrastiveInputs(codes=flat, gram=lora_B.t() @ lora_B, recompute=recompute)
            return ContrastiveInputs(outputs=self.expert_outputs(codes, dora))

    def expert_outputs(self, codes: Tensor, dora: DoraState | None = None) -> Tensor:
        """Every expert's output E_i(x) (N, E, d_out) from the codes (N, E, r): see ``comoe.dora``."""
        return expert_outputs(codes, self.comoe_B, self.scaling, dora)

    def dora_scale(self, base_layer: nn.Module) -> Tensor | None:
        """DoRA's per-expert scales; None for LoRA experts."""
        return None

    def _base_output(self, call: ExpertCall, keep: Tensor | None, x_drop: Tensor) -> Tensor:
        """W0 x̃ without bias, (N, d_out) in the adapter's dtype: the base output itself when dropout is off."""
        if keep is None:
            return output_without_bias(
                call.base_out, getattr(call.base_layer, "bias", None), self.comoe_A.dtype
            )
        return F.linear(x_drop, base_weight(call.base_layer).to(x_drop.dtype))

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, r={self.r}, in={self.in_features}, out={self.out_features}"


@register
class DoraExperts(LoraExperts):
    """E DoRA experts: LoRA experts that also learn a magnitude per expert and output feature
    (``comoe_magnitude`` (E, d_out)); see ``comoe.dora``."""

    name = "dora"
    supports_plain = False
    supports_routing = False

    def __init__(self, base_layer: nn.Module, config: CoMoEConfig):
        super().__init__(base_layer, config)
        device = self.comoe_A.device
        self.comoe_magnitude = nn.Parameter(
            torch.empty(self.num_experts, self.out_features, device=device, dtype=torch.float32)
        )

    @torch.no_grad()
    def reset_parameters(self, base_layer: nn.Module) -> None:
        """LoRA's init, and magnitudes equal to the base weight's row norms: each expert starts as the
        identity update."""
        super().reset_parameters(base_layer)
        self.comoe_magnitude.copy_(base_weight(base_layer).norm(dim=1).expand_as(self.comoe_magnitude))

    def dora_scale(self, base_layer: nn.Module) -> Tensor:
        """c_i = m_i / ||W0 + s B_i A_i|| per expert and output feature, (E, d_out).

        The norm is computed without autograd, in fp32 under bf16 training too: DoRA (§4.3) treats it as a
        constant in backward.
        """
        weight = base_weight(base_layer)
        return dora_scale(
            weight, self.comoe_A, self.comoe_B, self.comoe_magnitude, self.scaling, self.num_experts
        )
