"""Routing health while training: per routed layer, over the real tokens of the forwards it watched, the
entropy of the expert load (1: every expert takes the same share; 0: one expert takes all), the busiest
and the idlest expert's share of the layer's token-expert assignments, and the experts that took no token.

It reads the routers' outputs through forward hooks that exist only while ``watching()``, so it changes
nothing the model computes; ``comoe train`` logs it every ``--routing_health_steps`` steps, and
``RoutingHealthCallback`` does the same for transformers' Trainer and TRL's trainers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback


def routed_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The routed layers of a comoe model, however it is wrapped (DDP, ``CoMoEModel``, a plain
    ``PeftModel``); empty for any other model."""
    model = getattr(model, "module", model)  # DDP
    for holder in (model, getattr(model, "base_model", None)):
        layers = getattr(holder, "routed_modules", None)
        if isinstance(layers, dict):
            return dict(layers)
    return {}


class RoutingHealth:
    """Per routed layer of ``model``, the real tokens each expert takes while ``watching()``."""

    def __init__(self, model: nn.Module):
        self.layers = routed_layers(model)
        self.counts: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Count the tokens of every forward inside the block (not an activation-checkpointing recompute).
        A compiled graph does not see hooks added after it was made, so its forwards run eagerly here."""
        self.counts = {}
        handles = [
            layer.router.register_forward_hook(self._hook(name, layer)) for name, layer in self.layers.items()
        ]
        try:
            with torch.compiler.set_stance("force_eager"):
                yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, name: str, layer: nn.Module):
        def hook(router: nn.Module, _args: tuple, routing: Any) -> None:
            if not layer.context.active:  # a recompute inside backward: counted already
                return
            active = routing.active(router.num_experts)
            mask = layer.context.mask_for(active.shape[0])
            counts = (active if mask is None else active[mask]).sum(0)
            self.counts[name] = self.counts[name] + counts if name in self.counts else counts

        return hook

    def read(self) -> dict[str, float]:
        """Each layer's health over what ``watching`` counted, summed over the processes of a distributed
        run (every process calls it): ``routing/<layer>/load_entropy``, ``busiest_share``, ``idlest_share``,
        ``dead_experts``."""
        names = sorted(self.counts)
        if not names:
            return {}
        counts = torch.stack([self.counts[name].double() for name in names])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        counts = counts.cpu()
        share = counts / counts.sum(1, keepdim=True).clamp_min(1)
        entropy = -(share * share.clamp_min(1e-12).log()).sum(1) / math.log(counts.shape[1])
        health: dict[str, float] = {}
        for i, name in enumerate(names):
            health[f"routing/{name}/load_entropy"] = round(float(entropy[i]), 6)
            health[f"routing/{name}/busiest_share"] = round(float(share[i].max()), 6)
            health[f"routing/{name}/idlest_share"] = round(float(share[i].min()), 6)
            health[f"routing/{name}/dead_experts"] = int((counts[i] == 0).sum())
        return health


def health_summary(health: dict[str, float]) -> dict[str, float]:
    """What ``train_log.jsonl`` keeps of the routing health: the worst layer's entropy, the busiest share
    of any expert, and the dead experts of all layers."""

    def values(metric: str) -> list[float]:
        return [value for key, value in health.items() if key.endswith(f"/{metric}")]

    return {
        "routing_entropy_min": min(values("load_entropy")),
        "routing_busiest_share": max(values("busiest_share")),
        "routing_dead_experts": int(sum(values("dead_experts"))),
    }


class RoutingHealthCallback(TrainerCallback):
    """Routing health for transformers' ``Trainer`` and TRL's trainers: every ``every`` optimiser steps it
    watches one step and logs each routed layer's health through ``trainer.log``, so it reaches the
    trainer's trackers (``report_to``) and ``trainer.state.log_history``::

        trainer.add_callback(RoutingHealthCallback(trainer, every=10))
    """

    def __init__(self, trainer: Any, every: int = 10):
        if every < 1:
            raise ValueError(f"every must be >= 1 step, got {every}")
        self.trainer, self.every = trainer, every
        self._health: RoutingHealth | None = None
        self._watch: Any = None  # the open ``watching()`` of the step being watched

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if (state.global_step + 1) % self.every == 0:
            self._health = RoutingHealth(model if model is not None else self.trainer.model)
            self._watch = self._health.watching()
            self._watch.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if self._watch is None:
            return
        self._watch.__exit__(None, None, None)
        self._watch = None
        health = self._health.read()
        if health:
            self.trainer.log(health)
