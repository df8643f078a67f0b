"""Run settings from where they come from: a YAML file, a grid's base and cells, the flags given, a saved
run. Each source is a layer of fields, nested (`nest_fields`) and merged over the ones before
(`merge_fields`); `resolve_run` is the one function that turns layers into a `RunConfig`.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from comoe.config import CoMoEConfig
from comoe.training.run_adapter import ADAPTER_FIELDS, NAME_LISTS, split_names
from comoe.training.run_config import RunConfig
from comoe.utils.validation import describe_value, parse_text, unknown_fields

_RUN_FIELDS = tuple(f.name for f in fields(RunConfig))


def nest_fields(data: Mapping[str, Any], source: str = "config") -> dict[str, Any]:
    """``data``'s RunConfig fields with every adapter field under ``"adapter"``.

    Adapter fields may be given nested (``adapter: {r: 8}``, the form comoe writes), dotted
    (``adapter.r``, as ``--set`` takes them) or flat (``r: 8``, as comoe 0.1 wrote ``run_config.yaml``).
    Unknown keys are an error that suggests the closest field; a field given twice with two values too.
    """
    nested = data.get("adapter", {})
    if isinstance(nested, CoMoEConfig):
        nested = nested.method_dict()
    if not isinstance(nested, Mapping):
        raise ValueError(
            f"{source}: adapter must be a mapping of adapter fields ({', '.join(ADAPTER_FIELDS)}), "
            f"got {describe_value(nested)}"
        )
    out: dict[str, Any] = {}
    adapter = dict(nested)
    spelled = {name: f"adapter.{name}" for name in adapter}
    unknown = [f"adapter.{name}" for name in adapter if name not in ADAPTER_FIELDS]
    for key, value in data.items():
        name = key.removeprefix("adapter.") if isinstance(key, str) else key
        if key == "adapter":
            continue
        if key in _RUN_FIELDS:
            out[key] = value
        elif name in ADAPTER_FIELDS:
            if name in adapter and adapter[name] != value:
                raise ValueError(
                    f"{source}: {name} is given twice, as {spelled[name]} ({adapter[name]!r}) and as {key} "
                    f"({value!r}); keep one"
                )
            adapter[name], spelled[name] = value, key
        else:
            unknown.append(str(key))
    if unknown:
        known = [*_RUN_FIELDS, *(f"adapter.{name}" for name in ADAPTER_FIELDS)]
        raise ValueError(f"{source}: {unknown_fields(unknown, known)}")
    if adapter or "adapter" in data:
        out["adapter"] = adapter
    return out


def merge_fields(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Nested field mappings (see `nest_fields`) layered left to right; adapter fields merge one by one."""
    merged: dict[str, Any] = {}
    for layer in layers:
        adapter = {**merged.get("adapter", {}), **layer.get("adapter", {})}
        merged.update(layer)
        if adapter:
            merged["adapter"] = adapter
    return merged


Layer = tuple[str, Mapping[str, Any]]  # (where the fields come from, for errors; the fields)


def layered_fields(*layers: Layer) -> dict[str, Any]:
    """Each layer's fields nested (see `nest_fields`; errors name its source), merged left to right."""
    return merge_fields(*(nest_fields(data, source) for source, data in layers))


def resolve_run(*layers: Layer, source: str | None = None) -> RunConfig:
    """The run's settings: RunConfig's defaults < each layer in turn (a YAML file, a grid's base and cell,
    the flags given, a saved run). Every command resolves a run here. Errors in the combined fields name
    ``source`` (default: the last layer's)."""
    return RunConfig.from_dict(layered_fields(*layers), source=source or layers[-1][0])


def flat_fields(run: RunConfig) -> dict[str, Any]:
    """``run``'s fields in one level, the adapter's as ``adapter.NAME``: what a resume compares."""
    data = run.to_dict()
    adapter = data.pop("adapter")
    return {**data, **{f"adapter.{name}": value for name, value in adapter.items()}}


# --- a field's value from text (flags, --set FIELD=VALUE) -------------------------------------------
_HINTS = {
    **{name: hint for name, hint in typing.get_type_hints(RunConfig).items() if name != "adapter"},
    **{name: typing.get_type_hints(CoMoEConfig)[name] for name in ADAPTER_FIELDS},
}


def parse_field_value(name: str, text: str) -> Any:
    """Read a command-line string as the type of field ``name`` (a RunConfig field or an adapter field,
    ``r`` or ``adapter.r``); a ValueError names the flag."""
    name = name.removeprefix("adapter.")
    if name not in _HINTS:
        raise ValueError(unknown_fields([name], _HINTS))
    hint = _HINTS[name]
    if name in NAME_LISTS and text.strip().lower() != "none":
        return split_names(name, text)
    return parse_text(text, hint, f"--{name.replace('_', '-')}")
