"""What earlier comoe versions wrote or offered, read as this version expects it (the compatibility
policy is in CHANGELOG.md). Old module paths are in ``comoe.moved``."""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from comoe.auxiliary import AuxLosses


_HOLDER = re.compile(r"\.(?:experts|router)\.(?=comoe_)")  # the modules that hold adapter tensors since 0.2


def legacy_adapter_name(name: str) -> str:
    """The name comoe 0.1 gave the adapter tensor ``name``: it kept every tensor on the adapted layer itself
    (``q_proj.comoe_A``, ``q_proj.comoe_router``), where this version keeps them in the layer's ``experts``
    and ``router`` modules (``q_proj.experts.comoe_A``, ``q_proj.router.comoe_router``)."""
    return _HOLDER.sub(".", name)


def upgraded_adapter_tensors(tensors: dict[str, Tensor], expected: dict) -> dict[str, Tensor]:
    """Saved adapter tensors as this version names them (``expected``'s names). Files written by comoe 0.1
    are renamed (``legacy_adapter_name``; their keys are fitted to PEFT's prefix by ``comoe.loading``),
    and the (1, d_in) routers that versions before 0.2 saved for single-expert layers (plain LoRA) are
    dropped: such a layer has no router, since its one gate is always 1."""
    current = {legacy_adapter_name(name): name for name in expected}
    upgraded = {}
    for name, value in tensors.items():
        if name not in expected and name in current:
            name = current[name]
        if name in expected or not (name.endswith("comoe_router") and value.shape[0] == 1):
            upgraded[name] = value
    return upgraded


# the order in which comoe 0.1 registered a layer's adapter tensors, so the order of its optimizer state
_LEGACY_ORDER = ("comoe_A", "comoe_B", "comoe_router", "comoe_magnitude") + tuple(
    f"comoe_{proj}_{ab}" for proj in ("gate", "up", "down") for ab in "AB"
)


def legacy_parameter_order(names: list[str]) -> list[str]:
    """The parameters ``names`` (this version's, in its order) in comoe 0.1's order and by its names: layer
    by layer, each layer's tensors in the order 0.1 registered them (A, B, router, DoRA's magnitude; FFN
    experts' router after their six tensors). Other parameters keep their place."""
    ordered: list[str] = []
    layer_of = {}
    for name in names:
        legacy = legacy_adapter_name(name)
        layer, _, tensor = legacy.rpartition(".")
        layer_of[legacy] = layer if tensor in _LEGACY_ORDER else legacy
        ordered.append(legacy)
    first = {}
    for position, legacy in enumerate(ordered):
        first.setdefault(layer_of[legacy], position)

    def key(legacy: str) -> tuple[int, int]:
        tensor = legacy.rpartition(".")[2]
        ffn = tensor == "comoe_router" and f"{layer_of[legacy]}.comoe_gate_A" in layer_of
        rank = len(_LEGACY_ORDER) if ffn else _LEGACY_ORDER.index(tensor) if tensor in _LEGACY_ORDER else 0
        return first[layer_of[legacy]], rank

    return sorted(ordered, key=key)


def moved_tensor(holder: str, name: str) -> property:
    """A layer property for the adapter tensor ``name`` that comoe 0.1 kept on the layer itself and this
    version keeps in the layer's ``holder`` module (``experts`` or ``router``): it warns and names the new
    place. A layer without the module or the tensor (one expert has no router) gives None."""

    def get(layer: Any) -> Any:
        warnings.warn(
            f"layer.{name} is deprecated and goes in the next release: read layer.{holder}.{name}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(getattr(layer, holder), name, None)

    return property(get)


class DeprecatedAuxLosses:
    """``outputs.aux_losses``, the ``AuxLosses`` of the forward as earlier comoe returned it: each read warns
    and names the output fields that replace it (``aux_loss``, ``contrastive_loss``, ``balance_loss``)."""

    def __init__(self, aux: AuxLosses):
        self._aux = aux

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        replacement = {"total": "outputs.aux_loss", "contrastive": "outputs.contrastive_loss"}.get(
            name, "outputs.balance_loss" if name == "balance" else f"model.last_aux.{name}"
        )
        warnings.warn(
            f"outputs.aux_losses is deprecated and goes in the next release: read {replacement} instead of "
            f"outputs.aux_losses.{name}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(self._aux, name)
