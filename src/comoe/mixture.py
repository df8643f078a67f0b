"""``MixtureLayer``: what every routed adapter layer shares.

PEFT's tuner-layer protocol (one adapter, never merged), the fp32 router weight and the router module
(``comoe.routers``) that turns its logits into a ``Routing``, and the one-way hand-off of each call's
``LayerTrace`` to the forward context. ``comoe.layer.CoMoELayer`` (experts on one linear) and
``comoe.ffn.CoMoEFFNLayer`` (whole-FFN experts on an MLP block) are its two kinds.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.recompute import upcast_linear
from comoe.routers import ROUTERS, Routing, build_router, single_expert_routing
from comoe.trace import ContrastiveInputs, ForwardContext, LayerTrace

MERGE_REFUSED = (
    "a CoMoE adapter cannot be merged into the base weights: each token's update depends on which experts its "
    "router selects, so no single weight matrix reproduces the adapted layer. Keep the adapter unmerged (it "
    "runs as it trained), or use unload() to get the base model back without the adapter"
)
ONE_ADAPTER = "comoe holds one adapter per model"


class MixtureLayer(nn.Module, BaseTunerLayer):
    """The shared part of a routed adapter layer.

    Subclasses set up their tensors after ``_init_tuner_layer`` and call ``_make_router``; they implement
    ``adapter_parameters`` and a forward that calls ``route`` and, when ``_wants_aux()``, ``_leave_trace``.
    """

    def _init_tuner_layer(self, base_layer: nn.Module, config: CoMoEConfig, context, name, adapter_name):
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.num_experts, self.r, self.top_k = config.num_experts, config.r, config.top_k
        self.config = config
        self.context: ForwardContext = context
        self.module_name = name
        self.scaling = config.scaling
        self.router = build_router(config, self.num_experts)
        # whether this layer's routing leaves positives and negatives for the contrastive loss
        self.contrastive_capable = (
            self.router is not None and ROUTERS[config.routing].contrastive_problem(config) is None
        )

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

    def route(self, x: Tensor) -> Routing:
        """This call's routing from the fp32 router logits. ``probs`` is None without autograd when no
        auxiliary loss or record wants it (generation)."""
        if self.comoe_router is None:  # one expert: every token's gate is 1
            return single_expert_routing(x.shape[0], x.device, every_expert=self.config.routing == "soft")
        dtype = torch.promote_types(self.comoe_router.dtype, torch.float32)  # fp32, or fp64 if asked
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would round the logits
            logits = upcast_linear(x, self.comoe_router.to(dtype))
        return self.router(logits, want_probs=torch.is_grad_enabled() or self._wants_aux())

    @property
    def uses_every_expert(self) -> bool:
        """Whether every token uses every expert (soft routing, k = E, or a single expert)."""
        return self.router is None or self.router.uses_every_expert

    # --- what a call leaves after the forward ----------------------------------------------------
    def _contrastive_in_training(self) -> bool:
        """Whether a training forward forms the contrastive loss's inputs with autograd. Decided from static
        state only (training mode and lambda), never from the context's flags, so that an
        activation-checkpointing recompute of this forward (inside backward, flags reset) runs exactly the
        ops of the original forward."""
        return self.contrastive_capable and self.training and self.config.contrastive_weight > 0

    def _wants_aux(self) -> bool:
        """Whether this call's routing is needed after the forward: for auxiliary losses or routing records."""
        ctx = self.context
        needed = (ctx.active and (ctx.compute_contrastive or ctx.compute_balance)) or ctx.recorder is not None
        return self.routed and needed

    def _wants_contrastive_record(self) -> bool:
        """Whether an evaluation forward should form the contrastive inputs (without autograd) for records."""
        return self.contrastive_capable and self.context.active and self.context.compute_contrastive

    def _sample_tokens(self, n_tokens: int) -> Tensor | None:
        """The tokens of this call whose expert outputs the recorder keeps, or None."""
        recorder = self.context.recorder
        if recorder is None or not recorder.wants_codes(self.module_name):
            return None
        return recorder.sample_tokens(self.module_name, self.context.mask_for(n_tokens), n_tokens)

    def _recomputing(self) -> bool:
        """Whether this call is an activation-checkpointing recompute (inside backward): already traced."""
        return not self.context.active and self.training and torch.is_grad_enabled()

    def _leave_trace(self, routing: Routing, contrastive: ContrastiveInputs | None, samples: Tensor | None):
        """Hand this call's trace to the context (``comoe.auxiliary`` forms the losses after the forward).

        Outside a forward of the adapted model (a submodule run alone) only records are taken, at once. A
        training forward with autograd outside it is a checkpointing recompute: already traced."""
        ctx = self.context
        router_trains = self.comoe_router is not None and self.comoe_router.requires_grad
        adapter_trains = any(p.requires_grad for p in self.adapter_parameters())
        trace = LayerTrace(
            self.module_name, self.config, routing, contrastive, samples, router_trains, adapter_trains
        )
        if ctx.active:
            ctx.traces.append(trace)
        elif ctx.recorder is not None and not (self.training and torch.is_grad_enabled()):
            detached = routing._replace(probs=routing.probs.detach())
            ctx.recorder.observe(trace._replace(routing=detached, contrastive=None), None, None, None)
