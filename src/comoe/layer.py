"""The adapted linear: a frozen base layer plus a routed mixture of LoRA experts.

    y = W0 x + (α/r) Σ_i g_i(x) B_i A_i dropout(x)

With DoRA experts (``use_dora``) expert i also has a magnitude m_i per output feature and contributes
its DoRA update c_i ⊙ (W0 + s B_i A_i) x̃ − W0 x̃, where c_i = m_i / ||W0 + s B_i A_i|| (row norms, held
constant in backward as DoRA prescribes), so

    y = W0 x + Σ_i g_i(x) [ s c_i ⊙ B_i A_i x̃ + (c_i − 1) ⊙ W0 x̃ ],   x̃ = dropout(x).

The c_i fold into B (one elementwise scale) and the second term is one (N, E) @ (E, d_out) product, so
both expert paths keep their shape; the row norms come from rank-r products, never an E × d_out × d_in
tensor.

The E experts are stored stacked (``comoe_A``: (E·r, d_in), ``comoe_B``: (d_out, E·r)) so that the
default "dense codes" forward computes every expert's rank-r code in one matmul, zeroes the codes of
unselected experts through the gates and applies all B's in a second matmul: a fixed number of ops, no
data-dependent shapes, no host syncs. It does E/k times the FLOPs of a sparse path; when E·r is large
against d_in the "grouped" path (tokens sorted by expert, ``grouped_mm``) does only the selected work,
but its sorting, gathers and scatter cost more than the FLOPs it saves wherever measured (CPU and H200), so
``auto`` is dense. Both are exact, so the choice is purely one of speed.

``MixtureLayer`` holds what every routed adapter layer shares (PEFT's tuner-layer protocol, the router, the
auxiliary losses and records); ``CoMoELayer`` here and ``comoe.ffn.CoMoEFFNLayer`` (whole-FFN experts) are
its two kinds.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
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
from comoe.losses import (
    ContrastiveOutput,
    active_mask,
    contrastive_loss,
    contrastive_loss_materialized,
    draw_anchors,
    draw_negatives,
    gram_matrices,
    load_balancing_loss,
    stacked_cosines,
    stacked_info_nce,
)
from comoe.recompute import recomputed, upcast_linear

try:  # transformers' GPT-2 style linear (weight stored as (in, out))
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

ADAPTABLE_TYPES: tuple[type, ...] = (nn.Linear, Conv1D) if Conv1D != () else (nn.Linear,)


@dataclass
class ModuleAux:
    """Auxiliary losses of one adapted module in one forward."""

    name: str
    contrastive: ContrastiveOutput | None = None
    balance: Tensor | None = None


@dataclass
class ForwardContext:
    """State the model wrapper shares with all its layers for the current forward pass.

    While ``active`` (inside a forward of the adapted model, see ``comoe.tuner``) each layer only leaves what its auxiliary losses need
    in ``pending``; ``collect()`` computes the losses after the base model's forward. Activation
    checkpointing re-runs a layer's forward inside backward, so that forward must run the same ops whatever
    these flags say (they are reset by then), and the losses must not be part of it.
    """

    token_mask: Tensor | None = None  # (batch*seq,) bool, false on padding
    task_ids: Tensor | None = None  # (batch*seq,) long, for routing records
    compute_contrastive: bool = False
    compute_balance: bool = False
    aux: list[ModuleAux] = field(default_factory=list)
    recorder: object | None = None  # comoe.records.RoutingRecorder when recording
    active: bool = False
    pending: list[tuple] = field(default_factory=list)  # (layer, state, probs, top_idx) per call

    def collect(self) -> list[ModuleAux]:
        """Compute the auxiliary losses (and routing records) of the layer calls since the last collect.

        The Gram-form contrastive losses of calls with the same shapes and settings are computed together,
        one batched call per group (``stacked_contrastive``): the loss is ~100 small ops, paid once per
        group instead of once per module."""
        pending, self.pending = self.pending, []
        if not pending:
            return self.aux
        # fp32 losses whatever the model's autocast (on every device its modules sit on): their inputs are
        # cast up, their products stay there
        kinds = sorted(
            {probs.device.type for _, _, probs, _ in pending}
        )  # e.g. cpu and cuda under device_map
        with torch.autocast(kinds[0], enabled=False), torch.autocast(kinds[-1], enabled=False):
            stacked = stacked_contrastive(pending, self.token_mask) if self.compute_contrastive else {}
            for index, (layer, state, probs, top_idx) in enumerate(pending):
                layer._auxiliary(state, probs, top_idx, stacked.get(index))
        return self.aux


def stacked_contrastive(pending: list[tuple], token_mask: Tensor | None) -> dict[int, ContrastiveOutput]:
    """The contrastive losses of the pending calls that share token count, E, r and settings, by their index
    in ``pending``: one batched computation per group (``_group_contrastive``), its anchors and negatives
    drawn at once.

    The form follows the shapes: the Gram form where the Gram matrices are no larger than the codes
    (E·r ≤ N), taking modules of any d_out in one group
    (they meet through their Gram matrices); the anchor form otherwise, one group per d_out. Calls that
    stand alone (DoRA and FFN experts, the materialised form, a unique shape) are left to their layer."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, (layer, state, _, top_idx) in enumerate(pending):
        if isinstance(layer, CoMoELayer) and layer._stackable(state, top_idx):
            codes = state[0]
            form = "gram" if layer.num_experts * layer.r <= codes.shape[0] else "anchor"
            d_out = None if form == "gram" else layer.out_features
            groups[(id(layer.config), codes.shape, codes.dtype, codes.device, form, d_out)].append(index)
    results = {}
    for key, indices in groups.items():
        if len(indices) > 1:
            results.update(_group_contrastive(pending, indices, key[4], token_mask))
    return results


def _group_contrastive(
    pending: list[tuple], indices: list[int], form: str, token_mask: Tensor | None
) -> dict[int, ContrastiveOutput]:
    """One group's losses. The cosines' N × E·r intermediates (about five per module) are recomputed in
    backward, keeping only their inputs (the codes, which the layers keep anyway, and the Gram matrices or
    B's), where E·r ≥ d_in/4 for some module: there they would weigh as much as what the layers keep
    (x, the dropout mask, the codes). Below that they are kept: recomputing costs ~4 % of a SmolLM2 step
    (``benchmarks/memory_lean.py``). The InfoNCE part works on (N, A, E) cosines and keeps its own."""
    layers = [pending[i][0] for i in indices]
    cfg, n_exp = layers[0].config, layers[0].num_experts
    top_idx = torch.stack([pending[i][3] for i in indices])  # (M, N, k)
    n_mod, n_tokens, _ = top_idx.shape
    flat_idx = top_idx.view(n_mod * n_tokens, -1)
    anchors = draw_anchors(flat_idx, cfg.anchor).view(n_mod, n_tokens, -1)
    negatives = draw_negatives(flat_idx, n_exp, cfg.num_negatives).view(n_mod, n_tokens, n_exp)
    codes = [pending[i][1][0] for i in indices]  # each call's (codes, dora)[0], (N, E*r)
    lora_B = [layer.comoe_B for layer in layers]
    experts = [gram_matrices(lora_B)] if form == "gram" else lora_B  # G once, outside any recomputation
    cosines_of = partial(_group_cosines, form, n_exp, cfg.norm_eps)
    heavy = any(4 * n_exp * layer.r >= layer.in_features for layer in layers)
    if heavy and not torch.compiler.is_compiling():  # a compiler decides what to keep itself
        (cos,) = recomputed(cosines_of, anchors, *codes, *experts)
    else:
        (cos,) = cosines_of(anchors, *codes, *experts)
    active = active_mask(flat_idx, n_exp).view(n_mod, n_tokens, n_exp)
    mask = token_mask if token_mask is not None and token_mask.numel() == n_tokens else None
    out = stacked_info_nce(cos, anchors, active, negatives, cfg.temperature, cfg.epsilon, mask)
    return {
        index: ContrastiveOutput(out.loss[slot], out.pos_cos[slot], out.neg_cos[slot])
        for slot, index in enumerate(indices)
    }


def _group_cosines(
    form: str, n_exp: int, norm_eps: float, anchors: Tensor, *codes_and_experts: Tensor
) -> tuple[Tensor]:
    """``stacked_cosines`` of a group from its M codes (N, E*r) followed by their Gram matrices
    (M, E*r, E*r) (Gram form) or their M B's (D, E*r) (anchor form)."""
    n_mod = anchors.shape[0]
    codes = torch.stack(codes_and_experts[:n_mod])
    codes = codes.view(n_mod, codes.shape[1], n_exp, -1)
    experts = codes_and_experts[n_mod:]
    if form == "gram":
        return (stacked_cosines(codes, None, anchors, norm_eps, gram=experts[0]),)
    return (stacked_cosines(codes, experts, anchors, norm_eps, form),)


def base_weight(layer: nn.Module) -> Tensor:
    """The frozen weight as (d_out, d_in) in fp32, dequantised when bitsandbytes quantised it.

    int8 is dequantised here (CB · SCB / 127): PEFT's helper moves an int8 weight in a way that loses
    bitsandbytes' CPU state for the next forward."""
    from peft.utils.integrations import dequantize_module_weight

    if type(layer.weight).__name__ == "Int8Params" and layer.weight.dtype == torch.int8:
        scales = getattr(layer.weight, "SCB", None)
        if scales is None:  # moved to the layer's state by its first forward
            scales = layer.state.SCB
        return layer.weight.data.float() * scales.float()[:, None] / 127
    weight = dequantize_module_weight(layer)
    if Conv1D != () and isinstance(layer, Conv1D):
        weight = weight.t()
    return weight.detach().float()


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


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or a transformers Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if Conv1D != () and isinstance(layer, Conv1D):
        d_in, d_out = layer.weight.shape
        return d_in, d_out
    raise TypeError(
        f"cannot adapt {type(layer).__name__}: only nn.Linear and transformers Conv1D are supported"
    )


MERGE_REFUSED = (
    "a CoMoE adapter cannot be merged into the base weights: each token's update depends on which experts its "
    "router selects, so no single weight matrix reproduces the adapted layer. Keep the adapter unmerged (it "
    "runs as it trained), or use unload() to get the base model back without the adapter"
)
ONE_ADAPTER = "comoe holds one adapter per model"


class MixtureLayer(nn.Module, BaseTunerLayer):
    """What every routed adapter layer shares: PEFT's tuner-layer protocol (one adapter, never merged), the
    fp32 router, and the auxiliary losses and records computed from what a forward left pending.

    Subclasses (``CoMoELayer`` on one linear, ``comoe.ffn.CoMoEFFNLayer`` on an MLP block) set
    ``num_experts``, ``top_k``, ``config``, ``context``, ``module_name``, ``comoe_router`` (None for a single
    expert: plain LoRA, nothing to route) and implement ``adapter_parameters``, ``_contrastive_from`` and
    ``sampled_expert_outputs``. The state a forward leaves for them is the subclass's own.
    """

    def _init_tuner_layer(self, base_layer: nn.Module, config: CoMoEConfig, context, name, adapter_name):
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.num_experts, self.r, self.top_k = config.num_experts, config.r, config.top_k
        self.config = config
        self.context = context
        self.module_name = name
        self.scaling = config.scaling

    # --- PEFT's tuner-layer protocol: one adapter, never merged ----------------------------------
    @property
    def disabled(self) -> bool:
        """True while the layer runs as its base layer alone."""
        return self._disable_adapters

    @disabled.setter
    def disabled(self, value: bool) -> None:
        self._disable_adapters = bool(value)

    @property
    def routed(self) -> bool:
        """Whether tokens are routed: a single expert is plain LoRA (no router, no routing records)."""
        return self.comoe_router is not None

    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch; unlike PEFT's layers it leaves ``requires_grad`` as it was."""
        self.disabled = not enabled

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if names != [self._active_adapter]:
            raise ValueError(f"{ONE_ADAPTER}, named {self._active_adapter!r}; cannot activate {names}")
        for param in self.adapter_parameters():
            param.requires_grad_(not inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    # --- routing ---------------------------------------------------------------------------------
    def _make_router(self, d_in: int, device: torch.device) -> None:
        router = torch.empty(self.num_experts, d_in, device=device, dtype=torch.float32)
        self.register_parameter("comoe_router", nn.Parameter(router) if self.num_experts > 1 else None)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        """fp32 router. Returns softmax probs (N, E) (None without autograd when no auxiliary loss or record
        wants them), top-k ids (N, k) or None (soft), gates (N, E)."""
        if self.comoe_router is None:  # one expert: every token's gate is 1
            ones = torch.ones(x.shape[0], 1, device=x.device, dtype=torch.float32)
            top_idx = None if self.config.routing == "soft" else torch.zeros_like(ones, dtype=torch.long)
            return ones, top_idx, ones
        dtype = torch.promote_types(self.comoe_router.dtype, torch.float32)  # fp32, or fp64 if asked
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would round the logits
            logits = upcast_linear(x, self.comoe_router.to(dtype))
        if self.config.routing == "soft":
            probs = logits.softmax(dim=-1)
            return probs, None, probs
        # the top-k of the softmax renormalised = the softmax of the top-k logits: fewer ops, forward and
        # backward (the full softmax feeds only the balance loss and the records; no gradient flows through
        # it otherwise). Without autograd it is computed only when those want it (generation does not).
        top_logits, top_idx = logits.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(logits).scatter(1, top_idx, top_logits.softmax(dim=-1))
        probs = logits.softmax(dim=-1) if torch.is_grad_enabled() or self._wants_aux() else None
        return probs, top_idx, gates

    def _wants_aux(self) -> bool:
        """Whether this call's routing is needed after the forward: for auxiliary losses or routing records."""
        ctx = self.context
        needed = (ctx.active and (ctx.compute_contrastive or ctx.compute_balance)) or ctx.recorder is not None
        return self.routed and needed

    def _leave_pending(self, state: object, probs: Tensor, top_idx: Tensor | None) -> None:
        """Leave this call's routing for the auxiliary losses and records (computed after the model's forward).

        Outside a forward of the adapted model (a submodule run alone) only records are taken, at once. A
        training forward with autograd outside it is a checkpointing recompute: already recorded."""
        ctx = self.context
        if ctx.active:
            ctx.pending.append((self, state, probs, top_idx))
        elif ctx.recorder is not None and not (self.training and torch.is_grad_enabled()):
            ctx.recorder.observe(self, probs.detach(), top_idx, None, None, None, state)

    def _has_contrastive(self) -> bool:
        """Whether this layer's routing leaves positives and negatives for the contrastive loss."""
        return self.config.routing == "topk" and 2 <= self.top_k < self.num_experts

    # --- auxiliary losses --------------------------------------------------------------------------
    def _auxiliary(
        self, state: object, probs: Tensor, top_idx: Tensor | None, con: ContrastiveOutput | None = None
    ) -> None:
        """This layer's auxiliary losses and records for one call, from what its forward left pending;
        ``con``: its contrastive loss when computed with other modules' (``stacked_contrastive``)."""
        ctx = self.context
        n_tokens = probs.shape[0]
        token_mask = (
            ctx.token_mask if ctx.token_mask is not None and ctx.token_mask.numel() == n_tokens else None
        )
        bal = None
        wanted = ctx.compute_contrastive and state is not None and top_idx is not None
        if con is None and wanted and self._has_contrastive():
            con = self.contrastive(state, top_idx, token_mask)
        if ctx.compute_balance:
            bal = load_balancing_loss(probs, top_idx, token_mask)
        if self.training and torch.is_grad_enabled():
            self._check_differentiable(state, probs, con, bal)
        if con is not None or bal is not None:
            ctx.aux.append(ModuleAux(self.module_name, con, bal))
        if ctx.recorder is not None:
            ctx.recorder.observe(self, probs.detach(), top_idx, token_mask, ctx.task_ids, con, state)

    def _state_has_grad(self, state: object) -> bool:
        """Whether the contrastive loss computed from ``state`` reaches every parameter it should."""
        return True

    def _check_differentiable(self, state: object, probs: Tensor, con, bal) -> None:
        """A weighted aux loss computed from tensors without autograd history would silently add nothing
        to the gradient: that is what reentrant activation checkpointing does (its forward runs under
        no_grad). Refuse it loudly."""
        trainable = any(p.requires_grad for p in self.adapter_parameters())
        # probs come from a router that requires grad: without history, the forward ran without autograd
        no_autograd = self.comoe_router.requires_grad and not probs.requires_grad
        lost = (
            con is not None
            and self.config.contrastive_weight > 0
            and trainable
            and (no_autograd or not self._state_has_grad(state))
        ) or (bal is not None and self.config.balance_weight > 0 and no_autograd)
        if lost:
            raise RuntimeError(
                f"{self.module_name}: the auxiliary losses were computed without autograd history, so they "
                "would add nothing to the gradient. Reentrant activation checkpointing does this; enable it "
                "with gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default)."
            )

    def contrastive(self, state: object, top_idx: Tensor, token_mask: Tensor | None) -> ContrastiveOutput:
        """This module's contrastive loss for one call, drawing anchors and negatives."""
        cfg = self.config
        kwargs = dict(
            temperature=cfg.temperature,
            epsilon=cfg.epsilon,
            anchors=draw_anchors(top_idx, cfg.anchor),
            negatives=draw_negatives(top_idx, self.num_experts, cfg.num_negatives),
            token_mask=token_mask,
            norm_eps=cfg.norm_eps,
        )
        return self._contrastive_from(state, top_idx, kwargs)

    def _contrastive_from(self, state: object, top_idx: Tensor, kwargs: dict) -> ContrastiveOutput:
        raise NotImplementedError

    def sampled_expert_outputs(self, state: object, idx: Tensor) -> Tensor:
        """Every expert's output E_i(x) for the tokens ``idx`` of one call, (n, E, D) fp32 on the CPU."""
        raise NotImplementedError


class CoMoELayer(MixtureLayer):
    """Wraps ``base_layer``; parameters whose names start with ``comoe_`` are the adapter.

    As a PEFT tuner layer it holds a single adapter (its parameters are not keyed by adapter name, so saved
    tensor names are the same as before comoe was a PEFT method); ``set_adapter`` accepts that one name.
    A single expert (``num_experts=1``) is plain LoRA (or DoRA): no router.
    """

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
        every_expert_active = config.routing == "soft" or self.top_k == self.num_experts
        self._path = "dense" if every_expert_active else config.expert_path
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
        probs, top_idx, gates = self.route(x_flat)
        if self._plain_inference(result, x_flat):  # generation, evaluation
            out = result.reshape(-1, self.out_features)
            out = dense_experts_added(out, x_flat, self.comoe_A, self.comoe_B, gates, self.r, self.scaling)
            return out.view(*lead_shape, self.out_features)
        ctx = self.context
        # Codes that carry the contrastive loss's gradient. Decided from static state only (training mode and
        # lambda), never from the context flags, so that an activation-checkpointing recompute of this
        # forward (inside backward, flags reset) runs exactly the ops of the original forward.
        codes_with_grad = self._has_contrastive() and self.training and self.config.contrastive_weight > 0
        codes = None
        path = self.expert_path
        scale = self.dora_scale()  # (E, d_out) for DoRA experts, else None
        lora_B = self.comoe_B if scale is None else self._scaled_B(scale)
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
                if codes_with_grad:
                    codes = x_drop @ self.comoe_A.t()
                delta = self._grouped_delta(x_drop, top_idx, gates, codes, lora_B) * self.scaling
        dora = None
        if scale is not None:
            base_out = self._base_output(result, x_drop)
            delta = delta + (gates.to(scale.dtype) @ (scale - 1)) * base_out
            dora = (scale, base_out)
        if self._wants_aux():
            recorder = ctx.recorder
            wants_codes = (ctx.compute_contrastive and self._has_contrastive()) or (
                recorder is not None and recorder.wants_codes(self.module_name)
            )
            if codes is None and wants_codes:
                with torch.no_grad():  # for records only: no gradient wanted, nothing saved for backward
                    codes = x_drop @ self.comoe_A.t()
            self._leave_pending(None if codes is None else (codes, dora), probs, top_idx)
        return result + delta.view(*lead_shape, self.out_features).to(result.dtype)

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

    def _scaled_B(self, scale: Tensor) -> Tensor:
        """B with expert i's columns scaled per output feature by c_i: (d_out, E*r)."""
        b = self.comoe_B.view(self.out_features, self.num_experts, self.r)
        return (b * scale.t()[:, :, None]).view(self.out_features, -1)

    def _base_output(self, result: Tensor, x_drop: Tensor) -> Tensor:
        """W0 x̃ without bias, (N, d_out) in the adapter's dtype: the base output itself when dropout is off."""
        if isinstance(self.dropout, nn.Identity) or not self.training:
            out = result.reshape(-1, self.out_features).to(self.comoe_A.dtype)
            bias = getattr(self.base_layer, "bias", None)
            return out - bias.to(out.dtype) if bias is not None else out
        return F.linear(x_drop, base_weight(self.base_layer).to(x_drop.dtype))

    def _grouped_delta(
        self, x_drop: Tensor, top_idx: Tensor, gates: Tensor, codes: Tensor | None, lora_B: Tensor
    ) -> Tensor:
        """Sorted-tokens path: each (token, selected expert) pair does only its own expert's work.

        Under autocast the products run in its dtype, as the dense path's do (``grouped_mm`` is not on
        autocast's lists: left alone it would run in float32)."""
        n_tokens = x_drop.shape[0]
        n_exp, rank = self.num_experts, self.r
        dtype = product_dtype(x_drop)
        x_drop, lora_A, lora_B = x_drop.to(dtype), self.comoe_A.to(dtype), lora_B.to(dtype)
        flat_expert = top_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        sorted_expert = flat_expert[order]
        token_of = order // self.top_k
        offsets = torch.bincount(flat_expert, minlength=n_exp).cumsum(0).to(torch.int32)
        if codes is not None:  # already computed for the contrastive loss
            sorted_codes = codes.view(n_tokens, n_exp, rank)[token_of, sorted_expert].to(dtype)
        else:
            a_t = lora_A.view(n_exp, rank, self.in_features).transpose(1, 2)  # (E, d_in, r)
            sorted_codes = grouped_matmul(x_drop[token_of], a_t, offsets)
        sorted_gates = gates[token_of, sorted_expert].to(sorted_codes.dtype)
        b_t = lora_B.view(self.out_features, n_exp, rank).permute(1, 2, 0)  # (E, r, d_out)
        sorted_out = grouped_matmul(sorted_codes * sorted_gates[:, None], b_t, offsets)
        delta = torch.zeros(n_tokens, self.out_features, dtype=sorted_out.dtype, device=sorted_out.device)
        return delta.index_add(0, token_of, sorted_out)

    def _state_has_grad(self, state: tuple) -> bool:
        codes, _ = state
        return codes.requires_grad

    def _stackable(self, state: tuple | None, top_idx: Tensor | None) -> bool:
        """Whether this call's contrastive loss can be computed together with other modules' (Gram form)."""
        dora = None if state is None else state[1]
        gram = self.config.contrastive_form == "gram"
        return state is not None and dora is None and gram and top_idx is not None and self._has_contrastive()

    def _contrastive_from(self, state: tuple, top_idx: Tensor, kwargs: dict) -> ContrastiveOutput:
        """Gram form from the codes (N, E·r); DoRA experts (``dora``: their scales and W0 x̃) take the
        materialised form: their outputs are not a function of the rank-r codes alone."""
        codes, dora = state
        codes = codes.view(-1, self.num_experts, self.r)
        if self.config.contrastive_form == "gram" and dora is None:
            return contrastive_loss(codes, self.comoe_B, top_idx, **kwargs)
        return contrastive_loss_materialized(self.expert_outputs(codes, dora), top_idx, **kwargs)

    def sampled_expert_outputs(self, state: tuple, idx: Tensor) -> Tensor:
        codes, dora = state
        codes = codes.view(codes.shape[0], self.num_experts, self.r)[idx].float()
        picked = None if dora is None else (dora[0].detach().float(), dora[1][idx].detach().float())
        return self.expert_outputs(codes, picked).float().cpu()

    def expert_outputs(self, codes: Tensor, dora: tuple | None = None) -> Tensor:
        """Materialise every expert's output E_i(x): (N, E, d_out). For the materialised loss and analysis.

        LoRA experts: B_i h_i (the scaling s left out: cosines do not see it). DoRA experts (``dora`` =
        (c (E, d_out), W0 x̃ (N, d_out))): s c_i ⊙ B_i h_i + (c_i − 1) ⊙ W0 x̃, the expert's whole update.
        """
        b = self.comoe_B.view(self.out_features, self.num_experts, self.r)
        lora = torch.einsum("ner,der->ned", codes.to(b.dtype), b)  # codes are bf16 under autocast
        if dora is None:
            return lora
        scale, base_out = dora
        return lora * (self.scaling * scale) + (scale - 1) * base_out[:, None, :]

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
            f"r={self.r}, routing={self.config.routing}, path={self.expert_path}"
            + (", dora" if self.comoe_magnitude is not None else "")
        )


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (grouped_mm's backward needs it)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # noqa: D102
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # noqa: D102
        return grad.contiguous()


def adapter_input(x: Tensor, adapter_dtype: torch.dtype) -> Tensor:
    """``x`` in the dtype the adapter takes it in: the adapter's, except under autocast for an input already
    in autocast's dtype, which stays in it. Every product would cast it there anyway, and the dropped input
    formed in bf16 equals the one formed in fp32 and then cast (one rounding either way): no full-width fp32
    copy is made, and none is kept for backward."""
    autocast = adapter_dtype != torch.float64 and torch.is_autocast_enabled(x.device.type)
    return x if autocast and product_dtype(x) == x.dtype else x.to(adapter_dtype)


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
    bounds = [0, *offsets.tolist()]  # fallback (no grouped_mm, or shapes/dtypes it rejects): one host sync
    return torch.cat([x[lo:hi] @ w for lo, hi, w in zip(bounds[:-1], bounds[1:], weights, strict=True)])
