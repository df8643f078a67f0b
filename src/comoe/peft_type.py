"""``PeftType.COMOE``: the member of PEFT's method enum that CoMoE is registered under.

PEFT registers a method with ``peft.utils.register_peft_method``, which accepts only names that the
``PeftType`` enum lists, and PEFT has no API to add one from outside its source tree. This module adds
the single member ``COMOE`` the way ``enum`` itself stores members (so ``PeftType("COMOE")``,
``PeftType.COMOE`` and iteration all see it); everything else goes through PEFT's public registration
(``comoe.tuner``). It is the one place that depends on PEFT's internals; the tests check it on the PEFT
versions that pyproject.toml allows.
"""

from __future__ import annotations

from peft.utils import PeftType

NAME = "COMOE"


def _add_member(enum_cls: type, name: str):
    """Add ``name`` (value ``name``) to a ``str``-valued enum; idempotent."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses to bind member names
    return member


COMOE: PeftType = _add_member(PeftType, NAME)
