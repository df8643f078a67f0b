"""FSDP2 (torch's ``fully_shard``) for a comoe model: which modules to shard, the mixed-precision policy that
keeps adapters and routers fp32, and the whole adapter and optimizer state gathered from their shards.

`comoe train` shards the model itself whenever ``accelerate launch`` runs an FSDP (version 2) config, on
GPUs and CPUs alike: accelerate shards only on GPUs (on CPUs it reports plain multi-process training), so
the path tested with CPU processes is the one GPUs take. The launch's settings come from the environment
accelerate sets. The sharded model is never handed to ``accelerator.prepare``: accelerate would wrap it
again (DDP on CPUs; on GPUs its own FSDP2, whose bf16 policy would cast the fp32 adapters to bf16).

A comoe model needs nothing of FSDP beyond a plain transformers model: shard each decoder layer (the
classes in the model's ``_no_split_modules``; every routed layer sits inside one) and then the
transformers model as the root. Everything the losses read from an adapter's weights is formed inside
its layer's forward, while FSDP holds them whole.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

FSDP_FLAG = "ACCELERATE_USE_FSDP"  # what `accelerate launch` sets for an FSDP config


@dataclass(frozen=True)
class FsdpPlan:
    """The settings of an FSDP launch that `comoe train` follows."""

    reshard_after_forward: bool = True
    offload_params: bool = False  # CPUOffloadPolicy, on GPUs only (on CPUs the parameters are there already)
    layer_classes: tuple[str, ...] = ()  # FSDP_TRANSFORMER_CLS_TO_WRAP; empty: the model's _no_split_modules


def fsdp_launch(environ: Mapping[str, str] = os.environ) -> FsdpPlan | None:
    """The FSDP plan of this launch (``accelerate launch`` with an FSDP config), or None (one process, DDP).

    FSDP version 1 is refused: its flat parameters need one dtype and one ``requires_grad`` per wrapped
    unit, and a decoder layer holds a frozen (bf16) base beside trainable fp32 experts."""
    if environ.get(FSDP_FLAG, "false").lower() != "true":
        return None
    if environ.get("FSDP_VERSION", "1") != "2":
        raise ValueError(
            "`comoe train` shards with FSDP version 2 only (FSDP 1's flat parameters need one dtype and one "
            "requires_grad per wrapped layer, and a layer holds a frozen base beside trainable experts): set "
            "fsdp_version: 2 in the accelerate config (examples/accelerate/fsdp2.yaml)"
        )
    if environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true":
        raise ValueError(
            "fsdp_activation_checkpointing is accelerate's, which `comoe train` does not use: set it to false "
            "and pass --gradient-checkpointing true (comoe's, non-reentrant, which the auxiliary losses need)"
        )
    classes = tuple(
        c.strip() for c in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip()
    )
    return FsdpPlan(
        reshard_after_forward=environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() == "true",
        offload_params=environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
        layer_classes=classes,
    )


def mixed_precision_policy():
    """FSDP2's policy for a comoe model: every parameter is gathered and computed in its own dtype (a bf16
    base stays bf16, experts and routers stay fp32; autocast decides the products' dtype), and gradients
    are reduced in fp32. Pass it to ``fully_shard(..., mp_policy=...)`` or accelerate's
    ``FullyShardedDataParallelPlugin(mixed_precision_policy=...)``."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)


def fsdp_layer_classes(model: nn.Module) -> tuple[str, ...]:
    """The names of the classes to shard one by one: the decoder layers transformers lists as
    ``_no_split_modules`` (what accelerate's and Trainer's TRANSFORMER_BASED_WRAP read, also through a
    PEFT model)."""
    return tuple(getattr(model, "_no_split_modules", None) or ())


def fsdp_units(model: nn.Module, class_names: tuple[str, ...] = ()) -> list[nn.Module]:
    """The modules ``comoe train`` shards before the root, innermost first: those of ``class_names`` (the
    decoder layers by default, see :func:`fsdp_layer_classes`)."""
    names = set(class_names or fsdp_layer_classes(model))
    units = [module for module in model.modules() if type(module).__name__ in names]
    if not units:
        raise ValueError(
            f"no module of the classes {sorted(names) or '(none listed)'} in {type(model).__name__} to shard "
            "one by one: name the decoder layer class as fsdp_transformer_layer_cls_to_wrap in the "
            "accelerate config"
        )
    return units[::-1]


def shard_model(model: nn.Module, plan: FsdpPlan, device: torch.device) -> nn.Module:
    """Shard ``model`` in place over all processes: each unit (:func:`fsdp_units`), then the transformers
    model as the root, with :func:`mixed_precision_policy`. The parameters move to ``device`` shard by
    shard (the whole base is never on one device). Build the optimizer afterwards: sharding replaces the
    parameters."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if plan.offload_params and device.type != "cpu" else OffloadPolicy()
    options = dict(
        reshard_after_forward=plan.reshard_after_forward,
        mp_policy=mixed_precision_policy(),
        offload_policy=offload,
    )
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for unit in fsdp_units(model, plan.layer_classes):
        fully_shard(unit, **options)
    fully_shard(root, **options)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Reduce-scatter the gradients in this backward (``enabled``), or keep accumulating them unsharded
    until the step's last micro-batch (FSDP2's ``no_sync``)."""
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_requires_gradient_sync(enabled, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=False)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The gradients' global norm across all shards (before clipping), clipped to ``max_norm``."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _options(**kwargs: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gathered_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole trainable tensors (the adapter) on the main process, on the CPU, keyed by their names in
    ``model``; an empty dict on the others. Every process calls it. Only the adapter is gathered, one tensor
    at a time: the frozen base stays sharded."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))


def save_sharded_adapter(model: nn.Module, directory, is_main_process: bool) -> None:
    """Save the whole adapter of a sharded ``model`` (``fully_shard``, by comoe or by accelerate/Trainer):
    every process calls it, the adapter tensors alone are gathered, and the main process writes them
    atomically (``model.save_pretrained``'s layout). Use it in place of ``save_pretrained``, which would
    write each process's shard, and of a full state dict, which would gather the base too."""
    from comoe.training.adapters import save_adapter

    state = gathered_trainable(model)
    if is_main_process:
        save_adapter(model, directory, state)


def gathered_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on the main process (CPU), keyed as ``optimizer.state_dict()`` keys it (by
    position); empty on the others. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))
    if not by_name.get("param_groups"):
        return {}
    order = [name for group in by_name["param_groups"] for name in group["params"]]
    index = {name: i for i, name in enumerate(order)}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    return {"state": {index[n]: s for n, s in by_name["state"].items()}, "param_groups": groups}


def load_whole_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    names: list[str],
) -> None:
    """Load whole tensors into a sharded ``model`` and ``optimizer``: ``trainable`` keyed by parameter name,
    ``optimizer_state`` by position in the optimizer, whose parameters are ``names``. Every process holds
    the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, trainable, options=_options(strict=False))
    by_name = {
        "state": {names[i]: s for i, s in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [names[i] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=_options())
