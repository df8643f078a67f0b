"""Type checks for the config dataclasses, driven by their type hints.

``check_field_types(config)`` runs first in ``CoMoEConfig.__post_init__`` and ``RunConfig.__post_init__``,
so a YAML ``batch_size: "8"`` or ``learning_rate: fast`` fails with a message naming the field, not with a
``TypeError`` from a later comparison or from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import types
import typing
from collections.abc import Iterable
from typing import Any

_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "none"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


class _Mismatch(Exception):
    """Internal: a value does not fit a type hint; ``args[0]`` may say which list item is wrong."""


class _NotFinite(Exception):
    """Internal: a float field holds inf or nan (no other member of a union can take it)."""


def check_field_types(instance: Any, only: Iterable[str] | None = None) -> None:
    """Check every field of dataclass ``instance`` (or those named in ``only``) against its type hint, in place.

    ints accept ints (not bools), floats accept ints and floats (ints become floats), bools only bools,
    strs only strs; ``X | None`` also accepts None, ``list[X]`` a list or tuple of X (stored as a list),
    and a union any of its members. Floats must be finite (no inf, no nan). Raises ValueError naming
    the field, the value and what would work.
    """
    hints = _type_hints(type(instance))
    for f in dataclasses.fields(instance):
        if only is not None and f.name not in only:
            continue
        value = getattr(instance, f.name)
        hint = hints[f.name]
        try:
            converted = _convert(value, hint)
        except _NotFinite as err:
            raise ValueError(f"{f.name} must be a finite number, got {err.args[0]}") from None
        except _Mismatch as err:
            detail = f" ({err.args[0]})" if err.args and err.args[0] else _unquote_hint(value, hint)
            raise ValueError(
                f"{f.name} must be {describe_hint(hint)}, got {describe_value(value)}{detail}"
            ) from None
        if converted is not value:
            setattr(instance, f.name, converted)


def doc(text: str, choices: Iterable[str] | None = None) -> dict[str, Any]:
    """A dataclass field's documentation (``field(metadata=doc(...))``): its ``--help`` text and allowed values."""
    return {"help": text, **({"choices": tuple(choices)} if choices else {})}


def parse_text(text: str, hint: Any, what: str) -> Any:
    """Read command-line ``text`` as type ``hint``: ``none`` for None, comma-separated lists, true/false/yes/
    no/1/0 for booleans. A ValueError names ``what`` (the flag) and says what would work."""
    members = _members(hint)
    if type(None) in members and text.strip().lower() == "none":
        return None
    for member in members:
        try:
            if typing.get_origin(member) is list:
                (item,) = typing.get_args(member)
                return [item(part.strip()) for part in text.split(",") if part.strip()]
            if member is bool:
                return _BOOLEANS[text.strip().lower()]
            if member is not type(None):
                return member(text)
        except (ValueError, KeyError):
            continue
    raise ValueError(f"{what}: cannot read {text!r} as {describe_hint(hint)}")


_BOOLEANS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def describe_hint(hint: Any) -> str:
    """What a type hint accepts, in words: ``list[int] | str | None`` → 'a list of integers, a string or none'."""
    members = _members(hint)
    if len(members) > 1:
        words = [describe_hint(m) for m in members]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint) or (Any,)
        return f"a list of {_PLURALS.get(item, describe_hint(item))}"
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def describe_value(value: Any) -> str:
    """A value with its kind, as a message shows it: "the string '8'", 'the float 2.5'."""
    if value is None:
        return "none"
    kinds = {
        bool: "boolean",
        str: "string",
        int: "integer",
        float: "float",
        list: "list",
        tuple: "tuple",
        dict: "mapping",
    }
    kind = next((word for cls, word in kinds.items() if isinstance(value, cls)), type(value).__name__)
    return f"the {kind} {value!r}"


def did_you_mean(unknown: Iterable[str], known: Iterable[str]) -> str:
    """ " (did you mean 'x' for 'y'?)" for the unknown names with a close known one, else ''."""
    known = list(known)
    pairs = [(name, difflib.get_close_matches(str(name), known, n=1)) for name in unknown]
    found = [f"{match[0]!r} for {name!r}" for name, match in pairs if match]
    return f" (did you mean {', '.join(found)}?)" if found else ""


def unknown_fields(unknown: Iterable[object], known: Iterable[str], kind: str = "") -> str:
    """The one message for keys that name no field: "unknown [KIND ]fields [...] (did you mean ...);
    known fields: [...]". A dotted name (``adapter.num_expert``) is matched on its last part."""
    unknown, known = sorted(map(str, unknown)), sorted(map(str, known))
    hint = did_you_mean(
        [name.rpartition(".")[2] for name in unknown], sorted({name.rpartition(".")[2] for name in known})
    )
    return f"unknown {kind + ' ' if kind else ''}fields {unknown}{hint}; known fields: {known}"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _members(hint: Any) -> tuple[Any, ...]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` wants it (an int as a float, a tuple as a list), or raise _Mismatch."""
    members = _members(hint)
    if len(members) > 1:
        details = []
        for member in members:
            try:
                return _convert(value, member)
            except _Mismatch as err:
                details += [d for d in err.args if d]
        raise _Mismatch(details[0] if details else "")
    if hint is Any:
        return value
    if typing.get_origin(hint) is list:
        if not isinstance(value, (list, tuple)):
            raise _Mismatch("")
        (item_hint,) = typing.get_args(hint) or (Any,)
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_convert(item, item_hint))
            except _Mismatch:
                raise _Mismatch(f"item {i} is {describe_value(item)}") from None
        return items
    if hint is type(None):
        if value is None:
            return value
        raise _Mismatch("")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch("")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return value if type(value) is int else int(value)
        raise _Mismatch("")
    if hint is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            try:
                converted = value if type(value) is float else float(value)
            except OverflowError:  # an integer beyond float range
                raise _NotFinite(repr(value)) from None
            if not math.isfinite(converted):
                raise _NotFinite(repr(converted))
            return converted
        raise _Mismatch("")
    if isinstance(hint, type) and not isinstance(value, hint):
        raise _Mismatch("")
    return value


def _unquote_hint(value: Any, hint: Any) -> str:
    """' (write 8 without quotes)' when a string would have fitted as a plain YAML number or boolean."""
    if isinstance(value, str):
        members = _members(hint)
        readers = [(int, int), (float, float), (bool, lambda s: {"true": True, "false": False}[s.lower()])]
        for target, read in readers:
            if target in members:
                try:
                    read(value.strip())
                except (ValueError, KeyError):
                    continue
                return f" (write {value.strip()} without quotes)"
    if isinstance(value, float) and int in _members(hint) and value.is_integer():
        return f" (write {int(value)})"
    return ""
