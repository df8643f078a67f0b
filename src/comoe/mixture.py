"""``MixtureLayer``: what every routed adapter layer shares.

PEFT's tuner-layer protocol (one adapter, never merged), the two modules that hold the adapter's tensors —
the router (``comoe.routers``), which turns tokens into a ``Routing``, and the experts (``comoe.experts``),
which compute with them — and the one-way hand-off of each call's ``LayerTrace`` to the forward context.
``comoe.layer.CoMoELayer`` (experts on one linear) and ``comoe.ffn.CoMoEFFNLayer`` (whole-FFN experts on
an MLP block) are its two kinds.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from comoe.compat import moved_tensor
from comoe.config import CoMoEConfig
from comoe.experts import ExpertCall, Experts, build_experts
from comoe.routers import ROUTERS, Routing, build_router, single_expert_routing
from comoe.trace import ContrastiveInputs, ForwardContext, LayerTrace, Samples

MERGE_REFUSED = (
    "a CoMoE adapter cannot be merged into the base weights: each token's update depends on which experts its "
    "router selects, so no single weight matrix reproduces the adapted layer. Keep the adapter unmerged (it "
    "runs as it trained), or use unload() to get the base model back without the adapter"
)
ONE_ADAPTER = "comoe holds one adapter per model"


class MixtureLayer(nn.Module, BaseTunerLayer):
    """The shared part of a routed adapter layer.

    ``_init_tuner_layer`` builds the experts and the router; a subclass's forward calls ``route``, then its
    experts with an ``ExpertCall`` (``_expert_call`` fills in what every kind needs), and, when
    ``_tracing()``, ``_leave_trace``.
    """

    def _init_tuner_layer(
        self,
        base_layer: nn.Module,
        config: CoMoEConfig,
        context: ForwardContext,
        name: str,
        adapter_name: str,
        d_in: int,
        ffn_block: bool = False,
    ) -> None:
        self.base_layer = base_layer
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.num_experts, self.r, self.top_k = config.num_experts, config.r, config.top_k
        self.config = config
        self.context: ForwardContext = context
        self.module_name = name
        self.pending_traces: list[LayerTrace] = []  # a compiled call's traces, until the model's forward ends
        self.scaling = config.scaling
        device = next(base_layer.parameters()).device
        self.experts: Experts = build_experts(base_layer, config, ffn_block)
        self.router = build_router(config, self.num_experts, d_in, device)
        # whether this layer's routing leaves positives and negatives for the contrastive loss
        self.contrastive_capable = (
            self.router is not None and ROUTERS[config.routing].contrastive_problem(config) is None
        )

    # comoe 0.1's names for the tensors, on the layer itself (comoe.compat)
    comoe_router = moved_tensor("router", "comoe_router")
    comoe_A = moved_tensor("experts", "comoe_A")
    comoe_B = moved_tensor("experts", "comoe_B")
    comoe_magnitude = moved_tensor("experts", "comoe_magnitude")
    comoe_gate_A = moved_tensor("experts", "comoe_gate_A")
    comoe_gate_B = moved_tensor("experts", "comoe_gate_B")
    comoe_up_A = moved_tensor("experts", "comoe_up_A")
    comoe_up_B = moved_tensor("experts", "comoe_up_B")
    comoe_down_A = moved_tensor("experts", "comoe_down_A")
    comoe_down_B = moved_tensor("experts", "comoe_down_B")

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
        return self.router is not None

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter tensor of this layer: the experts', then the router's."""
        router = [] if self.router is None else list(self.router.parameters())
        return list(self.experts.parameters()) + router

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The experts' init (LoRA's: A Kaiming-uniform, B zero), then the router's (a small normal)."""
        self.experts.reset_parameters(self.base_layer)
        if self.router is not None:
            self.router.reset_parameters()

    def enable_adapters(self, enabled: bool) -> None:
        """PEFT's switch; unlike PEFT's layers it leaves ``requires_grad`` as it was."""
        self.disabled = not enabled

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if names != [self._active_adapter]:
            raise ValueError(f"{ONE_ADAPTER}, named {self._active_adapter!r}; cannot activate {names}")
        for param in self.adapter_parameters():
            param.requires_grad_(not inference_mode)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's switch for the named adapter's gradients (this layer's one adapter)."""
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        if self._active_adapter in names:
            for param in self.adapter_parameters():
                param.requires_grad_(requires_grad)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise ValueError(MERGE_REFUSED)

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    # --- routing and the experts' call -----------------------------------------------------------
    def route(self, x: Tensor) -> Routing:
        """This call's routing (the router computes fp32 logits). ``probs`` is None without autograd when no
        auxiliary loss or record wants it (generation)."""
        if self.router is None:  # one expert: every token's gate is 1
            return single_expert_routing(x.shape[0], x.device, every_expert=self.config.routing == "soft")
        return self.router(x, want_probs=torch.is_grad_enabled() or self._wants_aux())

    def _expert_call(
        self, x: Tensor, base_out: Tensor | None, routing: Routing, tracing: bool, **fields
    ) -> ExpertCall:
        """The ``ExpertCall`` of this forward: what the contrastive loss and, when ``tracing``, the recorder
        want (decided here, from the layer's state and the context), and ``fields``."""
        return ExpertCall(
            x=x,
            base_layer=self.base_layer,
            base_out=base_out,
            routing=routing,
            contrastive=self._contrastive_in_training(),  # the codes then carry the loss's gradient
            record_contrastive=tracing and self._wants_contrastive_record(),
            sample_idx=self._sample_tokens(x.shape[0]) if tracing else None,
            norm_eps=self.config.norm_eps,
            **fields,
        )

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

    def _tracing(self) -> bool:
        """Whether this call leaves a trace: something wants its routing, and it is not a recompute."""
        return self._wants_aux() and not self._recomputing()

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

    def _leave_trace(self, routing: Routing, contrastive: ContrastiveInputs | None, samples: Samples | None):
        """Hand this call's trace to the context (``comoe.auxiliary`` forms the losses after the forward).

        Outside a forward of the adapted model (a submodule run alone) only records are taken, at once. A
        training forward with autograd outside it is a checkpointing recompute: already traced."""
        ctx = self.context
        router_trains = self.router is not None and self.router.comoe_router.requires_grad
        adapter_trains = any(p.requires_grad for p in self.adapter_parameters())
        trace = LayerTrace(self, self.config, routing, contrastive, samples, router_trains, adapter_trains)
        if ctx.active:
            # compiled, each layer keeps its own (a shared list's length would be a guard, and every layer a
            # graph of its own); the tuner gathers them after the forward, in the modules' order
            (self.pending_traces if torch.compiler.is_compiling() else ctx.traces).append(trace)
        elif ctx.recorder is not None and not (self.training and torch.is_grad_enabled()):
            detached = routing._replace(probs=routing.probs.detach())
            ctx.recorder.observe(trace._replace(routing=detached, contrastive=None), None, None, None)
