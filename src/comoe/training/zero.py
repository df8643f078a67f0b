"""DeepSpeed ZeRO (stages 1-3) for a comoe model: the engine `comoe train` drives, its configuration, and
the whole adapter and optimizer state gathered from (and scattered back to) the ZeRO partitions.

`comoe train` runs ZeRO whenever ``accelerate launch`` runs a DeepSpeed config, on GPUs and CPUs alike
(DeepSpeed picks its CPU accelerator where there is no GPU): comoe calls ``deepspeed.initialize`` itself
with torch's AdamW and keeps its own schedule, loss normalisation and checkpoints, so the path tested with
CPU processes is the one GPUs take. DeepSpeed's own precision modes are not used: they would cast the fp32
experts and routers to bf16. ``--bf16`` keeps the frozen base bf16 and runs under autocast, as on one
process.

ZeRO-3 gathers a module's parameters when the module runs, so ranks whose tokens pick different experts
must still run the same modules: in a comoe layer they do, whatever the routing (the E experts are one
module's stacked tensors, which the dense and the grouped path alike read whole), so no rank waits on a
gather another never starts and no module needs to be a ZeRO-3 leaf. (Marking the routed layers as
leaves makes DeepSpeed 0.19's backward meet an empty, released parameter: observed, not traced further.)
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ZERO_FLAG = "ACCELERATE_USE_DEEPSPEED"  # what `accelerate launch` sets for a DeepSpeed config
# settings of a DeepSpeed config file that are the run's flags in `comoe train`
RUN_SETTINGS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
)
_OFFLOAD = ("none", "cpu")


@dataclass(frozen=True)
class ZeroPlan:
    """The settings of a DeepSpeed launch that `comoe train` follows."""

    stage: int = 2
    offload_optimizer: str = "none"  # "cpu": optimizer state in host memory (on GPUs)
    offload_params: str = "none"  # "cpu": ZeRO-3's parameter partitions in host memory (on GPUs)
    extra: dict[str, Any] = field(default_factory=dict)  # other zero_optimization keys of a config file


def zero_launch(environ: Mapping[str, str] = os.environ) -> ZeroPlan | None:
    """The ZeRO plan of this launch (``accelerate launch`` with a DeepSpeed config), or None.

    What comoe cannot follow is refused here, before any work: a missing deepspeed package, stage 0, NVMe
    offload, ``zero3_init_flag`` (comoe loads the base whole on each process, then ZeRO partitions it), and
    in a ``deepspeed_config_file`` an optimizer, scheduler, fp16 or bf16 section (comoe's AdamW, schedule
    and ``--bf16`` are the run's)."""
    if environ.get(ZERO_FLAG, "false").lower() != "true":
        return None
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ValueError(
            "this launch runs a DeepSpeed config, but the deepspeed package is missing: "
            "pip install 'comoe[deepspeed]' (or launch with examples/accelerate/fsdp2.yaml)"
        ) from None
    zero = _config_file_zero(environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    stage = zero.pop("stage", None)
    if stage is None:
        stage = environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    offload_optimizer = zero.pop("offload_optimizer", {}).get("device") or environ.get(
        "ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none"
    )
    offload_params = zero.pop("offload_param", {}).get("device") or environ.get(
        "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none"
    )
    if str(stage) not in ("1", "2", "3"):
        raise ValueError(
            f"zero_stage {stage}: `comoe train` runs ZeRO stages 1, 2 and 3; for plain data parallelism "
            "launch with examples/accelerate/ddp.yaml"
        )
    for name, device in (
        ("offload_optimizer_device", offload_optimizer),
        ("offload_param_device", offload_params),
    ):
        if device not in _OFFLOAD:
            raise ValueError(f"{name}: {device!r}; `comoe train` offloads to 'cpu' or 'none' (not NVMe)")
    if environ.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true":
        raise ValueError(
            "zero3_init_flag: true builds the base partitioned, but `comoe train` loads the base whole on "
            "each process and ZeRO partitions it at start: set zero3_init_flag: false"
        )
    return ZeroPlan(int(stage), offload_optimizer, offload_params, zero)


@contextmanager
def without_zero_flag() -> Iterator[None]:
    """Hide the DeepSpeed launch from accelerate while an ``Accelerator`` is built: accelerate would hand
    precision and the model to its own DeepSpeed plugin, and comoe drives the engine itself."""
    flag = os.environ.pop(ZERO_FLAG, None)
    try:
        yield
    finally:
        if flag is not None:
            os.environ[ZERO_FLAG] = flag


def _config_file_zero(path: str | None) -> dict[str, Any]:
    """The ``zero_optimization`` section of a DeepSpeed config file, its "auto" values left out."""
    if not path:
        return {}
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"deepspeed_config_file {path}: {err}") from None
    owned = [key for key in ("optimizer", "scheduler") if key in config]
    owned += [key for key in ("fp16", "bf16") if config.get(key, {}).get("enabled") is True]
    owned += [key for key in RUN_SETTINGS if config.get(key, "auto") != "auto"]
    if owned:
        raise ValueError(
            f'deepspeed_config_file {path}: remove {", ".join(owned)} (or set it to "auto"): `comoe train` '
            "runs its own AdamW and schedule (--learning-rate, --scheduler), precision (--bf16: a bf16 base, "
            "fp32 experts), batch (--batch-size, --grad-accum) and clipping (--max-grad-norm)"
        )
    return {k: v for k, v in config.get("zero_optimization", {}).items() if v != "auto"}


def deepspeed_config(
    plan: ZeroPlan,
    micro_batch_size: int,
    grad_accum: int,
    max_grad_norm: float | None,
    trainable_numel: int | None = None,
) -> dict[str, Any]:
    """DeepSpeed's configuration for ``plan``: fp32 master weights for the trainable tensors (the base
    keeps its own dtype), torch's AdamW, gradient clipping at ``max_grad_norm`` (0: none). Only the adapter's
    gradients are reduced, so unless the plan sets them the reduce and all-gather buckets hold
    ``trainable_numel`` elements (DeepSpeed's default, 5e8, is a 2 GB fp32 buffer per process)."""
    zero: dict[str, Any] = {**plan.extra, "stage": plan.stage}
    if trainable_numel:
        zero.setdefault("reduce_bucket_size", trainable_numel)
        zero.setdefault("allgather_bucket_size", trainable_numel)
    if plan.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": plan.offload_optimizer}
    if plan.offload_params != "none" and plan.stage == 3:
        zero["offload_param"] = {"device": plan.offload_params}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0 if max_grad_norm is None else max_grad_norm,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW on ZeRO's flat fp32 partitions
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, config: dict[str, Any]):
    """The DeepSpeed engine of ``model`` with ``optimizer`` (torch's AdamW over the trainable tensors). The
    optimizer's param_groups stay the ones a scheduler built on it moves."""
    import deepspeed

    with _no_shared_memory_kernel():
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


@contextmanager
def _no_shared_memory_kernel() -> Iterator[None]:
    """On DeepSpeed's CPU accelerator its communicator compiles a C++ shared-memory all-reduce the first time
    it starts (tens of seconds, and a compiler) that only ``inference_all_reduce`` uses; training's
    collectives are torch's either way, so it is not built. A no-op where DeepSpeed runs on a GPU."""
    ds_torch = importlib.import_module("deepspeed.comm.torch")  # `deepspeed.comm.torch` as a name is torch
    build = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = build


def gathered_trainable(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The whole fp32 trainable tensors, on the CPU, keyed as ``params``; every process calls it (one
    gather per tensor: the frozen base stays partitioned)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {name: safe_get_full_fp32_param(p).detach().cpu().clone() for name, p in params.items()}


def save_zero_adapter(model: nn.Module, directory, is_main_process: bool) -> None:
    """Save the whole adapter of a model DeepSpeed's engine trains: every process calls it, the trainable
    tensors alone are gathered, and the main process writes them atomically (``model.save_pretrained``'s
    layout). ``save_pretrained`` itself would write each process's empty ZeRO-3 partitions."""
    from comoe.training.adapters import save_adapter

    model = getattr(model, "module", model)  # the engine's model, if given the engine
    state = gathered_trainable({name: p for name, p in model.named_parameters() if p.requires_grad})
    if is_main_process:
        save_adapter(model, directory, state)


def gathered_optimizer(engine, params: dict[str, nn.Parameter]) -> dict[str, Any]:
    """The whole AdamW state, keyed by position in ``params`` as ``optimizer.state_dict()`` keys it; every
    process calls it."""
    from deepspeed.utils import safe_get_full_optimizer_state

    step = _step_count(engine.optimizer)
    state: dict[int, dict[str, Any]] = {}
    if step is not None:
        for i, p in enumerate(params.values()):
            moments = {key: safe_get_full_optimizer_state(p, key) for key in ("exp_avg", "exp_avg_sq")}
            state[i] = {"step": step.clone(), **{k: v.detach().cpu().clone() for k, v in moments.items()}}
    (group,) = engine.optimizer.param_groups  # comoe trains one group
    settings = {k: v for k, v in group.items() if k != "params"}
    return {"state": state, "param_groups": [{**settings, "params": list(range(len(params)))}]}


def load_whole_state(
    engine,
    params: dict[str, nn.Parameter],
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Scatter whole tensors into ``engine``'s partitions: ``trainable`` into the module's parameters and
    ZeRO's fp32 master copies, ``optimizer_state`` (keyed by position in ``params``) into AdamW's state and
    its group's settings (the learning rate the schedule had set among them). Every process holds the
    whole state and keeps its partition."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    values = [trainable[name] for name in params]
    with deepspeed.zero.GatheredParameters(
        list(params.values()), modifier_rank=0, enabled=engine.zero_optimization_stage() == 3
    ):
        for p, value in zip(params.values(), values, strict=True):
            p.data.copy_(value.to(p.dtype))
    for p, value in zip(params.values(), values, strict=True):
        safe_set_full_fp32_param(p, value.to(torch.float32))
    (group,), (saved_group,) = engine.optimizer.param_groups, optimizer_state["param_groups"]
    group.update({key: value for key, value in saved_group.items() if key != "params"})
    if not optimizer_state["state"]:
        return
    _create_moments(engine.optimizer, optimizer_state["state"][0]["step"])
    for i, p in enumerate(params.values()):
        for key in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, optimizer_state["state"][i][key].to(torch.float32), key)


def grad_norm(engine) -> float:
    """The gradients' global norm of the last optimiser step, before clipping (inf where DeepSpeed found a
    non-finite gradient and skipped the step)."""
    norm = engine.get_global_grad_norm()
    return float(norm) if norm is not None else math.nan


def _flat_partitions(zero_optimizer) -> list[torch.Tensor]:
    """The fp32 partitions AdamW steps (its state is keyed by them): DeepSpeed's stage 1-2 and stage 3
    optimizers name them differently."""
    flat = getattr(zero_optimizer, "single_partition_of_fp32_groups", None)
    return list(flat if flat is not None else zero_optimizer.fp32_partitioned_groups_flat)


def _step_count(zero_optimizer) -> torch.Tensor | None:
    """AdamW's step count (the same for every tensor), or None before the first step."""
    state = zero_optimizer.optimizer.state
    for flat in _flat_partitions(zero_optimizer):
        if "step" in state.get(flat, {}):
            return torch.as_tensor(state[flat]["step"]).detach().cpu()
    return None


def _create_moments(zero_optimizer, step: torch.Tensor) -> None:
    """Give AdamW the state of a resumed run before its first step (AdamW creates it lazily): zero moments
    that the saved ones then fill, and the saved step count. ZeRO-1/2 also link each parameter to its
    slice of that state only after a first step; the link is made here."""
    state = zero_optimizer.optimizer.state
    for flat in _flat_partitions(zero_optimizer):
        state[flat] = {
            "step": step.clone().to(torch.float32),
            "exp_avg": torch.zeros_like(flat, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(flat, memory_format=torch.preserve_format),
        }
    link = getattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state", None)  # stages 1-2
    if link is not None:
        link()
