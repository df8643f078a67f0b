"""Which modules of a model a ``CoMoEConfig`` adapts: its ``target_modules`` and ``layers``."""

from __future__ import annotations

import re

from torch import nn

from comoe.config import CoMoEConfig
from comoe.frozen import ADAPTABLE_TYPES

_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def layer_index(module_name: str) -> int | None:
    """Index of the repeated block a module sits in: the first integer component of its dotted name."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def num_hidden_layers(model: nn.Module, names: list[str]) -> int:
    config = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def resolve_layers(spec: list[int] | str | None, n_layers: int) -> set[int] | None:
    """Layer indices selected by ``CoMoEConfig.layers``: None (all), a list, or a thirds group."""
    if spec is None:
        return None
    if isinstance(spec, str):
        bounds = [round(n_layers * i / 3) for i in range(4)]
        thirds = {
            name: set(range(bounds[i], bounds[i + 1])) for i, name in enumerate(("low", "middle", "high"))
        }
        return set().union(*(thirds[part] for part in spec.split("+")))
    bad = [i for i in spec if i >= n_layers]
    if bad:
        raise ValueError(f"layers {bad} do not exist: the model has {n_layers} layers (0..{n_layers - 1})")
    return set(spec)


def _matches(name: str, target: list[str] | str) -> bool:
    if isinstance(target, str):
        if target == "all-linear":
            return layer_index(name) is not None
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def adaptable_module_names(model: nn.Module) -> list[str]:
    """The distinct last components of every Linear/Conv1D in the model (what target_modules can name)."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, ADAPTABLE_TYPES)}
    )


def matching_modules(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Names of the Linear/Conv1D modules that ``target_modules`` names, in every layer."""
    candidates = [name for name, m in model.named_modules() if isinstance(m, ADAPTABLE_TYPES) and name]
    return [name for name in candidates if _matches(name, target_modules)]


def find_targets(model: nn.Module, config: CoMoEConfig) -> list[str]:
    """Names of the modules ``config`` adapts; a clear error when there are none."""
    matched = matching_modules(model, config.target_modules)
    if not matched:
        raise ValueError(
            f"target_modules={config.target_modules!r} matched no nn.Linear/Conv1D module of "
            f"{type(model).__name__}. Its adaptable module names are: {', '.join(adaptable_module_names(model))}"
        )
    allowed = resolve_layers(config.layers, num_hidden_layers(model, matched))
    if allowed is None:
        return matched
    selected = [name for name in matched if layer_index(name) in allowed]
    if not selected:
        raise ValueError(
            f"layers={config.layers!r} selected none of the matched modules ({len(matched)} matched)"
        )
    return selected
