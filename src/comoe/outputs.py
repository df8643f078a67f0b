"""Model outputs that carry the auxiliary losses as fields of their own type.

comoe sets ``aux_loss``, ``contrastive_loss`` and ``balance_loss`` on the wrapped model's output. Wrappers
take a ``ModelOutput`` apart and rebuild it from its dataclass fields (torch's pytree: DDP with
``find_unused_parameters``, as ``Trainer`` sets it for PEFT models, and with ``static_graph``), and a key
that is not a field makes the rebuild fail. So the output becomes an instance of a subclass of its own
type that has the three as fields, made once per type: every reader still sees its type (an
``isinstance`` of ``CausalLMOutputWithPast`` holds).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor
from transformers.utils import ModelOutput

AUX_FIELDS = ("aux_loss", "contrastive_loss", "balance_loss")

_WITH_AUX: dict[type, type | None] = {}


def output_type_with_aux(cls: type) -> type | None:
    """``cls`` with the auxiliary losses as optional fields (``cls`` itself when it has them), or None for
    an output that is not a ``ModelOutput`` dataclass."""
    if cls not in _WITH_AUX:
        if not (issubclass(cls, ModelOutput) and dataclasses.is_dataclass(cls)):
            _WITH_AUX[cls] = None
        else:
            have = {f.name for f in dataclasses.fields(cls)}
            missing = [name for name in AUX_FIELDS if name not in have]
            _WITH_AUX[cls] = cls if not missing else _subclass(cls, missing)
    return _WITH_AUX[cls]


def _subclass(cls: type, missing: list[str]) -> type | None:
    spec = [(name, Tensor | None, dataclasses.field(default=None)) for name in missing]
    try:  # ModelOutput registers each subclass with torch's pytree under its module and name
        return dataclasses.make_dataclass(
            f"{cls.__name__}WithCoMoELosses", spec, bases=(cls,), namespace={"__module__": __name__}
        )
    except ValueError:  # a type of the same name from another module is registered already
        return None


def with_aux_fields(outputs: Any, fields: dict[str, Tensor]) -> Any:
    """``outputs`` with ``fields`` set, as an instance of a type that has them as fields where it can be."""
    cls = output_type_with_aux(type(outputs)) if isinstance(outputs, ModelOutput) else None
    if cls is not None and cls is not type(outputs):
        outputs = cls(**outputs)
    for key, value in fields.items():
        outputs[key] = value
    return outputs
