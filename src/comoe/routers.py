"""Routers: how a token becomes the experts it uses and their gates.

A router is a module from the ``ROUTERS`` registry, named by ``CoMoEConfig.routing``. It holds its weight
``comoe_router`` (E, d_in), fp32 whatever the base dtype, computes the fp32 logits (N, E) of the tokens
in its forward and ``select``s a ``Routing`` from them. Everything downstream reads the ``Routing`` only:
the experts use ``gates``, the contrastive loss takes ``active()`` experts as positives and the rest as
negatives, the balance loss and the routing records take ``share()``.

Adding a router is one class here, registered with ``@register``, that implements ``select``, plus any
field it needs in ``CoMoEConfig``; ``contrastive_problem`` says when its routing leaves the contrastive loss
no positives or negatives.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from comoe.inference import router_logits, single_expert_gates, soft_gates, topk_gates, topp_gates
from comoe.recompute import upcast_linear


class Routing(NamedTuple):
    """One layer call's routing of N tokens among E experts."""

    gates: Tensor  # (N, E): each expert's weight in the token's output (0 where unselected)
    probs: (
        Tensor | None
    )  # (N, E): the router's softmax; None where nothing reads it (no balance loss, no record)
    selected: Tensor | None  # (N, k): the selected experts, best first; None when every expert is used
    slot_mask: Tensor | None = None  # (N, k) bool: which slots hold a selected expert; None: every slot

    def active(self, num_experts: int) -> Tensor:
        """(N, E) bool: each token's selected experts (every expert under soft routing)."""
        if self.selected is None:
            return torch.ones(self.gates.shape, dtype=torch.bool, device=self.gates.device)
        mask = torch.zeros(self.selected.shape[0], num_experts, dtype=torch.bool, device=self.selected.device)
        src = True if self.slot_mask is None else self.slot_mask
        return mask.scatter_(1, self.selected, src)

    def share(self) -> Tensor:
        """(N, E): each token's unit of assignment spread over its experts (1/|set| on each selected
        expert; the probabilities themselves when every expert is used). The f_e of the balance loss."""
        if self.selected is None:
            return self.probs
        active = self.active(self.probs.shape[1]).to(self.probs.dtype)
        if self.slot_mask is None:
            return active / self.selected.shape[1]
        return active / active.sum(-1, keepdim=True)


class Router(nn.Module):
    """Turns tokens (N, d_in) into a ``Routing`` among E experts through its weight ``comoe_router``."""

    name: ClassVar[str]
    fusable: ClassVar[bool] = False  # whether a training forward may route inside the experts' node

    def __init__(self, num_experts: int, config, d_in: int = 0, device: torch.device | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = config.top_k
        self.init_std = config.router_init_std
        self.comoe_router = nn.Parameter(torch.empty(num_experts, d_in, device=device, dtype=torch.float32))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A small normal init: every expert starts about equally likely."""
        nn.init.normal_(self.comoe_router, std=self.init_std)

    @classmethod
    def contrastive_problem(cls, config) -> str | None:
        """Why the contrastive loss has no positives or negatives under this routing, or None."""
        return None

    @property
    def max_selected(self) -> int:
        """The most experts a token uses (its slots): k, or E when every expert is used."""
        return self.top_k

    @property
    def uses_every_expert(self) -> bool:
        return self.max_selected == self.num_experts

    def forward(self, x: Tensor, want_probs: bool = True) -> Routing:
        """The routing of the tokens ``x`` (N, d_in); ``probs`` may be None when ``want_probs`` is false."""
        if not torch.is_grad_enabled():  # inference: comoe.inference's logits, as an exported model's
            return self.select(router_logits(x, self.comoe_router), want_probs)
        dtype = torch.promote_types(self.comoe_router.dtype, torch.float32)  # fp32, or fp64 if asked
        with torch.autocast(x.device.type, enabled=False):  # bf16 autocast would round the logits
            logits = upcast_linear(x, self.comoe_router.to(dtype))
        return self.select(logits, want_probs)

    def select(self, logits: Tensor, want_probs: bool = True) -> Routing:
        """The routing from the fp32 logits (N, E)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}"


ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``cls`` a ``routing`` choice under its ``name``."""
    ROUTERS[cls.name] = cls
    return cls


@register
class TopKRouter(Router):
    """The paper's: the k experts of highest probability, their probabilities renormalised."""

    name = "topk"
    fusable = True

    @classmethod
    def contrastive_problem(cls, config) -> str | None:
        if config.top_k < 2:
            return f"the contrastive loss needs at least one positive: top_k must be >= 2, got {config.top_k}"
        if config.top_k >= config.num_experts:
            return (
                f"the contrastive loss needs at least one negative: top_k ({config.top_k}) must be < "
                f"num_experts ({config.num_experts})"
            )
        return None

    def select(self, logits: Tensor, want_probs: bool = True) -> Routing:
        # the full softmax feeds only the balance loss and the records
        gates, top_idx = topk_gates(logits, self.top_k)
        probs = logits.softmax(dim=-1) if want_probs else None
        return Routing(gates, probs, top_idx)


@register
class SoftRouter(Router):
    """LoRAMoE-style: every expert, gated by its probability."""

    name = "soft"

    @classmethod
    def contrastive_problem(cls, config) -> str | None:
        return "the contrastive loss needs inactive experts as negatives, but routing='soft' activates all"

    @property
    def max_selected(self) -> int:
        return self.num_experts

    def select(self, logits: Tensor, want_probs: bool = True) -> Routing:
        probs = soft_gates(logits)
        return Routing(probs, probs, None)


@register
class TopPRouter(Router):
    """Dynamic routing (MoLA's and DynMoLE's): each token takes the smallest set of experts, best first,
    whose probabilities reach ``top_p``, at least one and at most ``top_k``; their probabilities
    renormalised are the gates. A confident token uses one expert, an uncertain one several."""

    name = "topp"

    def __init__(self, num_experts: int, config, d_in: int = 0, device: torch.device | None = None) -> None:
        super().__init__(num_experts, config, d_in, device)
        self.top_p = config.top_p

    @classmethod
    def contrastive_problem(cls, config) -> str | None:
        if config.top_k < 2:
            return (
                "the contrastive loss needs tokens with at least two experts: under routing='topp' top_k (the "
                f"most experts a token takes) must be >= 2, got {config.top_k}"
            )
        return TopKRouter.contrastive_problem(config)

    def select(self, logits: Tensor, want_probs: bool = True) -> Routing:
        gates, probs, top_idx, slot_mask = topp_gates(logits, self.top_k, self.top_p)
        return Routing(gates, probs, top_idx, slot_mask)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_p={self.top_p}, at most {self.top_k}"


def single_expert_routing(n_tokens: int, device: torch.device, every_expert: bool) -> Routing:
    """The routing of a layer with one expert (plain LoRA): every token's gate is 1."""
    ones = single_expert_gates(n_tokens, device)
    selected = None if every_expert else torch.zeros_like(ones, dtype=torch.long)
    return Routing(ones, ones, selected)


def build_router(config, num_experts: int, d_in: int, device: torch.device | None = None) -> Router | None:
    """The router ``config.routing`` names, for a layer of ``num_experts`` experts taking ``d_in`` features
    (None for one expert)."""
    return ROUTERS[config.routing](num_experts, config, d_in, device) if num_experts > 1 else None
