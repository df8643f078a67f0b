"""Atomic training checkpoints: adapter, optimizer, scheduler, RNG and position, with no pickles.

A checkpoint is a directory ``checkpoints/step-000050`` written first as a hidden ``.step-000050.*.tmp``
and renamed when complete, so a run killed at any moment leaves either the previous checkpoint or the new
one, never a half-written one; the hidden directory a killed write leaves is removed when the run starts
again (`remove_stale_writes`). Tensors go to safetensors files, everything else to JSON.

It holds the whole training state of every process: under FSDP and DeepSpeed ZeRO the adapter and the
optimizer state are gathered whole from their shards (adapter-sized tensors only, never the base) and the
main process writes them in the same files as an unsharded run's, so a checkpoint resumes on any number of
processes and under any of them; each process's RNG state is kept under its rank.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from comoe.compat import legacy_adapter_name, legacy_parameter_order
from comoe.training import sharding, zero
from comoe.training.adapters import load_adapter_weights, whole_adapter
from comoe.training.run_dir import ADAPTER_DIR
from comoe.utils.files import atomic_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")
_STEP_TMP = re.compile(r"^\.step-\d+\..*\.tmp$")  # utils.files' temporary name of a checkpoint being written


def optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and the rest (for JSON)."""
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *meta["scalars"].items()]:
        index, key = flat.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointError(ValueError):
    """A checkpoint that does not fit this run; nothing was restored from it."""


def optimizer_parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The names of the optimizer's parameters inside ``model``, in the optimizer's order."""
    names = {id(param): name for name, param in model.named_parameters()}
    return [names[id(param)] for group in optimizer.param_groups for param in group["params"]]


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by name, in ``model``'s order: the order of comoe's one optimizer group
    (under ZeRO the optimizer holds flat partitions instead of them)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _group_sizes(optimizer: torch.optim.Optimizer) -> list[int]:
    return [len(group["params"]) for group in optimizer.param_groups]


def optimizer_state_by_name(
    saved: dict[str, Any],
    saved_names: list[str],
    group_sizes: list[int],
    names: list[str],
    source: str,
) -> dict[str, Any]:
    """The optimizer state ``saved`` for the parameters ``saved_names``, reordered for an optimizer whose
    parameters are ``names`` in groups of ``group_sizes``. Saved names of an earlier version are matched
    through ``comoe.compat``, so a checkpoint resumes even where the parameters were renamed or registered
    in another order."""
    flat = [index for group in saved["param_groups"] for index in group["params"]]
    position = {name: j for j, name in enumerate(names)}
    for j, name in enumerate(names):
        position.setdefault(legacy_adapter_name(name), j)
    unknown = [name for name in saved_names if name not in position]
    covered = sorted(position[name] for name in saved_names if name in position) == list(range(len(names)))
    same_groups = len(saved["param_groups"]) == len(group_sizes)
    if len(flat) != len(saved_names) or unknown or not covered or not same_groups:
        raise CheckpointError(
            f"{source}: its optimizer state is for {len(saved_names)} tensors "
            f"{'(e.g. ' + unknown[0] + ') ' if unknown else ''}but this run trains {len(names)}: it was written "
            "for another adapter. Resume it with the configuration it was written with, or start a new run"
        )
    moved = {old: position[name] for old, name in zip(flat, saved_names, strict=True)}
    groups, start = [], 0
    for saved_group, size in zip(saved["param_groups"], group_sizes, strict=True):
        groups.append({**saved_group, "params": list(range(start, start + size))})
        start += size
    return {"state": {moved[old]: value for old, value in saved["state"].items()}, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    python_state = random.getstate()
    meta = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


class TrainingState(NamedTuple):
    """What a checkpoint holds of the model and optimizer, whole, on the main process."""

    adapter: dict[str, torch.Tensor] | None  # the trainable tensors by name; None: the live model's
    optimizer: dict[str, Any]  # the optimizer's state_dict (by position)
    names: list[str]  # the optimizer's parameters, in its order
    rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]]  # each process's RNG state, by rank


def training_state(model, optimizer, sharded: bool = False, engine=None) -> TrainingState:
    """The whole training state; every process calls it (under FSDP, ZeRO or DDP it gathers across
    processes), and only the main process's is complete. ``sharded``: ``model`` is sharded with FSDP2;
    ``engine``: the DeepSpeed engine that trains ``model``."""
    rngs = [rng_state()]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        rngs = [None] * dist.get_world_size()
        dist.all_gather_object(rngs, rng_state())
    if engine is not None:
        params = trainable_parameters(model)
        trainable, moments = zero.gathered_trainable(params), zero.gathered_optimizer(engine, params)
        return TrainingState(trainable, moments, list(params), rngs)
    names = optimizer_parameter_names(model, optimizer)
    if sharded:
        trainable = sharding.gathered_trainable(model)
        return TrainingState(trainable, sharding.gathered_optimizer(model, optimizer), names, rngs)
    return TrainingState(None, optimizer.state_dict(), names, rngs)


def save_checkpoint(
    root: str | Path,
    step: int,
    model,
    optimizer,
    scheduler,
    progress: dict[str, Any],
    keep: int = 1,
    state: TrainingState | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; keep only the newest ``keep``. ``state`` (from
    :func:`training_state`) is what to write; without it, this process's model and optimizer."""
    root = Path(root)
    final = root / f"step-{step:06d}"
    state = state or training_state(model, optimizer)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / ADAPTER_DIR, state_dict=state.adapter)
        opt_tensors, opt_meta = optimizer_to_files(state.optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        rng_tensors = {_rank_key(rank, k): v for rank, (t, _) in enumerate(state.rngs) for k, v in t.items()}
        save_file(rng_tensors, tmp / "rng.safetensors")
        trainer_state = {
            "step": step,
            "progress": progress,
            "parameters": state.names,  # the optimizer state's order
            "optimizer": opt_meta,
            "rng": state.rngs[0][1],
            "rng_by_rank": {str(rank): meta for rank, (_, meta) in enumerate(state.rngs) if rank},
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _rank_key(rank: int, key: str) -> str:
    """Rank 0's RNG tensors keep the names of a one-process checkpoint; the others' carry their rank."""
    return key if rank == 0 else f"rank{rank}.{key}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (half-written ``.tmp`` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def remove_stale_writes(root: str | Path) -> list[Path]:
    """Remove the hidden ``.step-*.tmp`` directories that checkpoint writes killed part-way left under
    ``root``; call it before this run writes any checkpoint. Returns what was removed."""
    root = Path(root)
    stale = [p for p in root.iterdir() if _STEP_TMP.match(p.name)] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def load_checkpoint(
    path: str | Path, model, optimizer, scheduler, rank: int = 0, sharded: bool = False, engine=None
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and this process's (``rank``'s) RNG from ``path``; returns the
    saved progress. ``sharded`` (FSDP2) or ``engine`` (the DeepSpeed engine training ``model``): every
    process reads the whole state and keeps its shard. A rank the checkpoint has no RNG state for (one
    written by fewer processes) takes rank 0's."""
    path = Path(path)
    state = json.loads((path / "trainer_state.json").read_text())
    params = trainable_parameters(model)
    names = list(params) if engine is not None else optimizer_parameter_names(model, optimizer)
    sizes = [len(names)] if engine is not None else _group_sizes(optimizer)
    saved_names = state.get("parameters") or legacy_parameter_order(names)  # comoe 0.1 saved no names
    saved = optimizer_from_files(load_file(path / "optimizer.safetensors"), state["optimizer"])
    saved = optimizer_state_by_name(saved, saved_names, sizes, names, str(path))
    if engine is not None:
        zero.load_whole_state(engine, params, whole_adapter(model, path / ADAPTER_DIR), saved)
    elif sharded:
        sharding.load_whole_state(model, optimizer, whole_adapter(model, path / ADAPTER_DIR), saved, names)
    else:
        load_adapter_weights(model, path / ADAPTER_DIR)
        optimizer.load_state_dict(saved)
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    meta = state.get("rng_by_rank", {}).get(str(rank))
    if meta is None:
        rank, meta = 0, state["rng"]
    set_rng_state(_rank_rng(load_file(path / "rng.safetensors"), rank), meta)
    return {"step": state["step"], **state["progress"]}


def _rank_rng(tensors: dict[str, torch.Tensor], rank: int) -> dict[str, torch.Tensor]:
    if rank == 0:
        return {k: v for k, v in tensors.items() if not k.startswith("rank")}
    prefix = f"rank{rank}."
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
