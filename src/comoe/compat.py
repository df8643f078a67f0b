"""What earlier comoe versions wrote or offered, read as this version expects it (the compatibility
policy is in CHANGELOG.md). Old module paths are in ``comoe.moved``."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from comoe.auxiliary import AuxLosses


def upgraded_adapter_tensors(tensors: dict[str, Tensor], expected: dict) -> dict[str, Tensor]:
    """Saved adapter tensors as this version names them. Files written by comoe 0.1 load as they are
    (their keys are fitted to PEFT's prefix by ``comoe.loading``) but for one thing: the (1, d_in) routers
    that versions before 0.2 saved for single-expert layers (plain LoRA) are dropped; such a layer has no
    router, since its one gate is always 1."""
    return {
        name: value
        for name, value in tensors.items()
        if name in expected or not (name.endswith("comoe_router") and value.shape[0] == 1)
    }


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
