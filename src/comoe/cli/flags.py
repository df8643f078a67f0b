"""One way to configure every command: flags generated from a documented dataclass, over ``--config FILE``.

Each command's settings are a dataclass whose fields carry their documentation (``metadata={"help": ...,
"choices": ...}``). transformers' ``HfArgumentParser`` turns them into flags (``--max-steps`` and
``--max_steps``, booleans as flags: ``--bf16``, ``--bf16 false``, ``--no-eval-base``); comoe adjusts three
things:

- a flag that is not given leaves no attribute on the namespace (``argparse.SUPPRESS``), so it leaves the
  value from ``--config`` alone, and ``--max-steps none`` (None) is told apart from no flag at all;
- values are read by the field's type as YAML strings are (``none``, comma-separated lists), with errors
  that name the flag; allowed values are checked by the dataclass itself, so a flag and a YAML key give
  the same message;
- the help shows the field's documentation, its allowed values and its default.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import MISSING, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from comoe.utils.validation import parse_text, unknown_fields
from comoe.utils.yaml_files import load_yaml_mapping

KEEP = object()  # a default shown as "the run's own": the flag changes a saved setting only when given


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, whose abbreviations are counted by flag, not by spelling: ``--output`` is
    ``--output-dir``, although ``--output_dir`` starts with it too; ``--eval`` still matches two flags."""

    def _get_option_tuples(self, option_string: str) -> list[tuple]:
        matches, seen = [], set()
        for match in super()._get_option_tuples(option_string):
            if id(match[0]) not in seen:  # match[0] is the action: one per flag, whatever its spellings
                seen.add(id(match[0]))
                matches.append(match)
        return matches


def field_flags(
    settings: type,
    *,
    only: Iterable[str] | None = None,
    exclude: Iterable[str] = (),
    group: str | None = None,
    parse: Callable[[str, str], Any] | None = None,
    default: object | None = None,
) -> argparse.ArgumentParser:
    """A parent parser with one flag per field of dataclass ``settings`` (or per field in ``only``).

    ``parse(name, text)`` reads a flag's text (default: by the field's type); ``group`` titles the flags
    in ``--help``; ``default=KEEP`` shows "Default: the run's own" instead of each field's default.
    """
    hints = typing.get_type_hints(settings)
    chosen = [
        f for f in fields(settings) if (only is None or f.name in set(only)) and f.name not in set(exclude)
    ]
    spec = make_dataclass(
        settings.__name__ + "Flags",
        [
            (
                f.name,
                hints[f.name],
                field(default=f.default, default_factory=f.default_factory, metadata=f.metadata),
            )
            for f in chosen
        ],
    )
    if group:
        spec._argument_group_name = group
    parser = HfArgumentParser(spec, add_help=False)
    for action in parser._actions:
        name = action.dest
        action.default = argparse.SUPPRESS
        action.option_strings.sort(key=lambda option: "_" in option)  # --max-steps first: usage and errors
        if isinstance(action, argparse._StoreFalseAction):  # --no-FIELD, the complement of a true default
            action.help = f"set {name} to false"
            continue
        read = parse or (lambda n, text, hint=hints[name]: parse_text(text, hint, _flag(n)))
        action.type = lambda text, name=name, read=read: _argument_value(read, name, text)
        action.choices = None
        if action.nargs == "+":  # lists are comma-separated, as in YAML strings
            action.nargs = None
        boolean = action.nargs == "?"
        metadata = next(f.metadata for f in chosen if f.name == name)
        action.metavar = _metavar(hints[name], metadata, boolean)
        shown = default if default is KEEP else _default(next(f for f in chosen if f.name == name))
        action.help = _help(metadata, shown, boolean)
    return parser


def given(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The fields among ``names`` whose flags were given (see `field_flags`), ``none`` values included."""
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def config_file(path: str | Path, known: Iterable[str], what: str) -> dict[str, Any]:
    """The mapping of fields in YAML file ``path`` (``--config``); unknown keys name the closest field."""
    data = load_yaml_mapping(path, f"{what} fields")
    known = list(known)
    unknown = set(data) - set(known)
    if unknown:
        raise ValueError(f"{path}: {unknown_fields(unknown, known)}")
    return data


def settings_from(
    settings: type, args: argparse.Namespace, source: str = "command line", **fixed: Any
) -> Any:
    """An instance of dataclass ``settings``: defaults < ``--config`` file < flags given < ``fixed``.

    A ValueError from the dataclass's own checks is prefixed with where the value came from.
    """
    names = [f.name for f in fields(settings)]
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(config_file(args.config, names, settings.__name__))
        source = f"{args.config} or the command line"
    values.update(given(args, names))
    values.update(fixed)
    try:
        return settings(**values)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _argument_value(read: Callable[[str, str], Any], name: str, text: str) -> Any:
    try:
        return read(name, text)
    except ValueError as err:  # argparse shows an ArgumentTypeError's own message
        raise argparse.ArgumentTypeError(str(err)) from err


def _metavar(hint: Any, doc: Mapping[str, Any], boolean: bool) -> str:
    """What the flag takes: ``{a,b}`` for a field with allowed values, else its type, e.g. ``INT``."""
    if boolean:
        return "BOOL"
    if doc.get("choices"):
        return "{" + ",".join(map(str, doc["choices"])) + "}"
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for kind, shown in ((list, "LIST"), (int, "INT"), (float, "FLOAT")):
        if any(member is kind or typing.get_origin(member) is kind for member in members):
            return shown
    return "TEXT"


def _help(doc: Mapping[str, Any], default: Any, boolean: bool) -> str:
    """The field's documentation, its allowed values and its default, argparse-escaped."""
    text = doc.get("help", "")
    if doc.get("choices"):
        text += f" One of: {', '.join(map(str, doc['choices']))}."
    if default is KEEP:
        return (text + " Default: the run's own.").replace("%", "%%")
    shown = (
        ",".join(map(str, default)) if isinstance(default, list) else "none" if default is None else default
    )
    text += f" Default: {str(shown).lower() if boolean else shown}."
    if boolean:
        text += " The flag alone means true."
    return text.replace("%", "%%")
