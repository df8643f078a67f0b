"""Watching a run: the accelerator it trains on and the trackers its scalars also go to (accelerate's:
TensorBoard, Weights & Biases, MLflow). Routing health is ``comoe.routing_health``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from comoe.training.sharding import fsdp_launch
from comoe.training.zero import without_zero_flag, zero_launch

REPORTERS = ("none", "tensorboard", "wandb", "mlflow")
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",)}
SUPPORTED_DISTRIBUTION = (
    DistributedType.NO,
    DistributedType.MULTI_CPU,
    DistributedType.MULTI_GPU,
    DistributedType.FSDP,  # comoe shards the model itself (comoe.training.sharding)
)


def reporter_problem(report_to: str) -> str | None:
    """Why ``report_to`` cannot be used here (its package is missing), or None."""
    packages = _PACKAGES.get(report_to, ())
    if packages and not any(importlib.util.find_spec(name) for name in packages):
        return f"report_to={report_to!r} needs the {packages[0]} package: pip install {packages[0]}"
    return None


def make_accelerator(run, tracking_dir: Path | None = None) -> Accelerator:
    """One process, DDP (torchrun / accelerate launch), FSDP2 or DeepSpeed ZeRO (accelerate launch with an
    FSDP or DeepSpeed config, on GPUs or CPUs), with ``run.report_to``'s tracker writing under
    ``tracking_dir``. A launch comoe cannot follow is refused before any work (``fsdp_launch``,
    ``zero_launch``)."""
    fsdp_launch()
    zero_launch()
    trackers = {} if run.report_to == "none" else {"log_with": run.report_to, "project_dir": tracking_dir}
    # accelerate only sets up multi-process CPU training (gloo) when told it is on the CPU; comoe drives
    # DeepSpeed's engine itself, so its accelerator is a plain multi-process one (autocast, collectives)
    with without_zero_flag():
        accelerator = Accelerator(
            mixed_precision="bf16" if run.bf16 else "no", cpu=not torch.cuda.is_available(), **trackers
        )
    if accelerator.distributed_type not in SUPPORTED_DISTRIBUTION:
        raise ValueError(
            f"`comoe train` runs on one process, with DDP, FSDP2 or DeepSpeed ZeRO, not "
            f"{accelerator.distributed_type.value}: launch with `torchrun` or an accelerate config from "
            "examples/accelerate (ddp.yaml, fsdp2.yaml, zero2.yaml, zero3.yaml)"
        )
    set_seed(run.seed)
    return accelerator


def end_processes() -> None:
    """Tear down this process's part of a multi-process launch (a no-op on one process) before it exits:
    a process group left to the interpreter's exit can abort it while its communication threads run."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
