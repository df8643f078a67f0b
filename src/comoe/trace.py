"""What the layers of one forward leave for the losses and records: data only, flowing one way.

Inside a forward of the adapted model each routed layer appends a ``LayerTrace`` to the shared
``ForwardContext``. A trace holds activations only: the routing, and what the contrastive loss needs from
the experts, formed inside the layer's forward while its weights are whole (the Gram matrix BᵀB of its
LoRA experts, or the materialised expert outputs). After the model's forward ``comoe.auxiliary`` turns the
traces into losses and hands them to the recorder; nothing reads a layer's weights after its forward, which
is what lets FSDP reshard them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from comoe.losses import ContrastiveOutput, materialized_cosines
from comoe.routers import Routing


class ContrastiveInputs(NamedTuple):
    """What one layer call leaves for its contrastive loss: the Gram form (``codes`` and ``gram``), the
    materialised form (``outputs``), or, in an evaluation forward, the materialised outputs' cosines."""

    codes: Tensor | None = None  # (N, E·r): every expert's code h_i = A_i x̃ (LoRA experts), side by side
    gram: Tensor | None = None  # (E·r, E·r): G = B_catᵀ B_cat, formed in the forward
    outputs: Tensor | None = None  # (N, E, D): every expert's output (DoRA, FFN experts; materialised form)
    cosines: Tensor | None = None  # (N, E, E): the outputs' cosines, kept instead where no gradient flows
    recompute: bool = False  # keep only the inputs of the cosines and recompute them in backward

    @property
    def has_grad(self) -> bool:
        """Whether a loss formed from these inputs reaches the adapter through autograd."""
        tensor = next(t for t in (self.codes, self.outputs, self.cosines) if t is not None)
        return tensor.requires_grad

    def compact(self, norm_eps: float) -> ContrastiveInputs:
        """The same inputs with the (N, E, D) outputs replaced by their (N, E, E) cosines: what an
        evaluation forward keeps for its records (no gradient flows; every layer's outputs would otherwise
        be held until the model's forward ends)."""
        if self.outputs is None:
            return self
        n_tokens, n_exp, _ = self.outputs.shape
        every = torch.arange(n_exp, device=self.outputs.device).expand(n_tokens, n_exp)
        return ContrastiveInputs(cosines=materialized_cosines(self.outputs, every, norm_eps))


class Samples(NamedTuple):
    """Expert outputs of a few of a call's tokens, for routing records (formed without autograd)."""

    idx: Tensor  # (n,): the tokens, chosen by the recorder
    outputs: Tensor  # (n, E, D) fp32


class LayerTrace(NamedTuple):
    """One routed layer call."""

    # the layer (its ``module_name`` is the trace's name; a compiled layer keeps no per-layer string in
    # its graph, so the layers of a model share one), or the name itself
    origin: object
    config: object  # the layer's CoMoEConfig (temperature, anchors, negatives, weights)
    routing: Routing
    contrastive: ContrastiveInputs | None  # None: no contrastive loss from this call
    samples: Samples | None  # expert outputs of the tokens the recorder samples
    router_trains: bool  # the router's weight requires grad: its losses must carry autograd history
    adapter_trains: bool  # some adapter tensor of the layer requires grad

    @property
    def name(self) -> str:
        """The module's name inside the model."""
        return self.origin if isinstance(self.origin, str) else self.origin.module_name


@dataclass
class ModuleAux:
    """Auxiliary losses of one adapted module in one forward."""

    name: str
    contrastive: ContrastiveOutput | None = None
    balance: Tensor | None = None


@dataclass
class ForwardContext:
    """State the model shares with its layers for the current forward pass.

    ``comoe.tuner`` sets the flags before the model's forward (``active`` while inside it) and reads
    ``traces`` after it. Activation checkpointing re-runs a layer's forward inside backward, with the flags
    reset: a layer decides which tensors to form from static state (training mode, the config), never from
    these flags, wherever autograd records what it forms.
    """

    token_mask: Tensor | None = None  # (batch*seq,) bool, false on padding
    task_ids: Tensor | None = None  # (batch*seq,) long, for routing records
    compute_contrastive: bool = False
    compute_balance: bool = False
    recorder: object | None = None  # comoe.records.RoutingRecorder when recording
    active: bool = False
    traces: list[LayerTrace] = field(default_factory=list)
    aux: list[ModuleAux] = field(default_factory=list)

    def mask_for(self, n_tokens: int) -> Tensor | None:
        """The padding mask, if it covers these ``n_tokens`` (a layer may see another token count)."""
        mask = self.token_mask
        return mask if mask is not None and mask.numel() == n_tokens else None
