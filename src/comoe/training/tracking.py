"""Watching a run: the accelerator it trains on, the trackers its scalars also go to (accelerate's:
TensorBoard, Weights & Biases, MLflow), and the routing health of its routed layers.

Routing health is read from the routers' outputs by forward hooks that exist only during the steps that
log it, so it changes nothing the run computes. Per routed layer, over the real tokens of one step: the
entropy of the expert load (1: every expert takes the same share; 0: one expert takes all), the busiest
and the idlest expert's share, and the experts that took no token.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch import nn

REPORTERS = ("none", "tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
SUPPORTED_DISTRIBUTION = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def reporter_problem(report_to: str) -> str | None:
    """Why ``report_to`` cannot be used here (its package is missing), or None."""
    packages = _PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        return f"report_to={report_to!r} needs the {packages[0]} package: pip install {packages[0]}"
    return None


def make_accelerator(run, tracking_dir: Path | None = None) -> Accelerator:
    """One process, or DDP (torchrun / accelerate launch), with ``run.report_to``'s tracker writing under
    ``tracking_dir``. FSDP and DeepSpeed are refused before any work: the checkpoints save the optimizer
    state of one process, which is only the whole state under DDP."""
    trackers = {} if run.report_to == "none" else {"log_with": run.report_to, "project_dir": tracking_dir}
    # accelerate only sets up multi-process CPU training (gloo) when told it is on the CPU
    accelerator = Accelerator(
        mixed_precision="bf16" if run.bf16 else "no", cpu=not torch.cuda.is_available(), **trackers
    )
    if accelerator.distributed_type not in SUPPORTED_DISTRIBUTION:
        raise ValueError(
            f"`comoe train` runs on one process or with DDP, not {accelerator.distributed_type.value}: "
            "its checkpoints hold one process's optimizer state; launch with `torchrun` or a plain "
            "multi-GPU `accelerate launch` config, or train through transformers' Trainer "
            '(see README "Use with PEFT / Trainer / TRL")'
        )
    set_seed(run.seed)
    return accelerator


def start_tracking(accelerator: Accelerator, run) -> None:
    """Open the run's tracker (if any), with the run's settings as its hyper-parameters."""
    if run.report_to != "none":
        accelerator.init_trackers("comoe", config=_flat(run.to_dict()))


def _flat(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Settings as trackers take them: one level, lists and None as text."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


class RoutingHealth:
    """Per routed layer of ``model``, the real tokens each expert takes while ``watching()``."""

    def __init__(self, model: nn.Module, accelerator: Accelerator):
        self.layers = dict(getattr(model, "routed_modules", {}))
        self.accelerator = accelerator
        self.counts: dict[str, torch.Tensor] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Count the tokens of every forward inside the block (not an activation-checkpointing recompute)."""
        self.counts = {}
        handles = [
            layer.router.register_forward_hook(self._hook(name, layer)) for name, layer in self.layers.items()
        ]
        try:
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
        """Each layer's health over what ``watching`` counted, summed over processes (every process calls
        it): ``routing/<layer>/load_entropy``, ``busiest_share``, ``idlest_share``, ``dead_experts``."""
        names = sorted(self.counts)
        if not names:
            return {}
        counts = torch.stack([self.counts[name].double() for name in names])
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts.to(self.accelerator.device), "sum")
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
