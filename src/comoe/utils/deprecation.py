"""Names that moved: the old name keeps working for one minor release, with a FutureWarning (shown to users,
unlike a DeprecationWarning) that names its replacement (CHANGELOG.md, compatibility policy). Old module
paths are ``comoe.moved``'s."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``moved`` (old name → ``"package.module:new_name"``): the new object,
    with a FutureWarning naming where it lives now."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, new = moved[name].partition(":")
        warnings.warn(
            f"{module}.{name} is deprecated and goes in the next release: use {where}.{new}",
            FutureWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), new)

    return __getattr__
