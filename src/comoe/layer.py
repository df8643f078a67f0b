"""The adapted linear: a frozen base layer plus a routed mixture of LoRA (or DoRA) experts.

    y = W0 x + (α/r) Σ_i g_i(x) B_i A_i dropout(x)

The layer routes the tokens (``comoe.routers``) and calls its experts (``comoe.experts``), which hold the
expert tensors and form, inside their forward, what the contrastive loss and the routing recorder need
from them; the layer hands that on in the call's ``LayerTrace``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from comoe.config import CoMoEConfig
from comoe.frozen import layer_features
from comoe.inference import adapter_input, adds_in_one_addmm
from comoe.mixture import MixtureLayer
from comoe.trace import ForwardContext
from comoe.utils.deprecation import moved_names


class CoMoELayer(MixtureLayer):
    """Wraps ``base_layer``; ``router`` and ``experts`` hold the adapter's tensors (their names start with
    ``comoe_``).

    As a PEFT tuner layer it holds a single adapter (its parameters are not keyed by adapter name);
    ``set_adapter`` accepts that one name. A single expert (``num_experts=1``) is plain LoRA (or DoRA): no
    router.
    """

    adapter_layer_names = ("experts", "router")  # PEFT's list: the modules holding the adapter's tensors

    def __init__(
        self,
        base_layer: nn.Module,
        config: CoMoEConfig,
        context: ForwardContext,
        name: str = "",
        adapter_name: str = "default",
    ):
        super().__init__()
        self.in_features, self.out_features = layer_features(base_layer)
        self._init_tuner_layer(base_layer, config, context, name, adapter_name, self.in_features)
        self._path = "dense" if self.uses_every_expert else config.expert_path
        self.reset_parameters()

    @property
    def expert_path(self) -> str:
        """The path the next forward takes. ``auto`` is the dense path: the grouped path was slower in every
        setting measured (BENCHMARKS.md: the CPU from hidden 64 to 1024; an H200 with LLaMA-2-7B-shaped
        layers, bf16 autocast, E up to 64, r up to 64, 2,048 to 8,192 tokens). It stays selectable."""
        return "dense" if self._path == "auto" else self._path

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        lead_shape = x.shape[:-1]
        x_flat = adapter_input(x.reshape(-1, self.in_features), self.experts.comoe_A.dtype)
        tracing = self._tracing()
        base_out = result.reshape(-1, self.out_features)
        if self._routes_in_experts():
            probs = "grad" if self.config.balance_weight > 0 else None
            if probs is None and self.context.recorder is not None:
                probs = "plain"
            call = self._expert_call(x_flat, base_out, None, tracing, router=self.router, probs=probs)
            output = self.experts(call)
            routing = output.routing
        else:
            routing = self.route(x_flat)
            plain = self._plain_inference(result, x_flat)
            output = self.experts(
                self._expert_call(x_flat, base_out, routing, tracing, path=self.expert_path, plain=plain)
            )
        if tracing:
            self._leave_trace(routing, output.contrastive, output.samples)
        return output.out.view(*lead_shape, self.out_features)

    def _routes_in_experts(self) -> bool:
        """Whether this call's routing runs inside the experts' autograd node (``comoe.fused``): a training
        forward with autograd, top-k routing, LoRA experts on the dense path, no hooks on the router (they
        see, and may replace, its routing), outside torch.compile (which plans the plain ops itself).
        Decided from the layer's state, never the context's, as an activation-checkpointing recompute must
        run the ops of the original forward."""
        return (
            self.training
            and torch.is_grad_enabled()
            and self.router is not None
            and self.router.fusable
            and self.experts.supports_routing
            and self.expert_path == "dense"
            and not (self.router._forward_hooks or self.router._forward_pre_hooks)
            and not torch.compiler.is_compiling()
        )

    def _plain_inference(self, result: Tensor, x: Tensor) -> bool:
        """Whether this call only adds the experts' update: no autograd, nothing recorded, the dense path,
        experts that take the shortcut (not DoRA), and the base output already in the dtype the products run
        in (addmm keeps it)."""
        return (
            not torch.is_grad_enabled()
            and not self.training
            and self.experts.supports_plain
            and self.expert_path == "dense"
            and not self._wants_aux()
            and adds_in_one_addmm(result, x)  # the dtype addmm computes in: the output's unchanged
        )

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, top_k={self.top_k}, "
            f"r={self.r}, routing={self.config.routing}, path={self.expert_path}, kind={self.experts.name}"
        )


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
