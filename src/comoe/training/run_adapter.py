"""The adapter inside a run: the settings given (what ``run_config.yaml`` keeps) and the adapter each
method trains from them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from comoe.config import ALL_LINEAR, CoMoEConfig, own_fields
from comoe.training.methods import FIXED_FIELDS, method_of

NAME_LISTS = ("tasks", "target_modules")  # a string is read as comma-separated names
ADAPTER_FIELDS = tuple(f.name for f in fields(CoMoEConfig) if f.name in own_fields())


def _settings_of(adapter: CoMoEConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Adapter settings as a plain mapping, ``target_modules`` read as a run reads it (comma lists)."""
    settings = adapter.method_dict() if isinstance(adapter, CoMoEConfig) else dict(adapter)
    if "target_modules" in settings:
        settings["target_modules"] = split_names("target_modules", settings["target_modules"])
    return settings


def given_adapter(method: str, adapter: CoMoEConfig | Mapping[str, Any]) -> CoMoEConfig:
    """The adapter settings as given, validated (what ``run_config.yaml`` keeps), so that the same file run
    with another ``method`` trains that method's adapter from the same settings.

    The settings are first checked as ``method`` will use them (errors name ``adapter.NAME``). Settings that
    are valid only once the method has fixed its fields (moe-lora with ``top_k=1`` and the default λ) are
    kept as the method fixes them.
    """
    settings = _settings_of(adapter)
    if not isinstance(adapter, CoMoEConfig):  # a mapping holds only what was given
        settings = {**method_of(method).defaults, **settings}
    trained = method_adapter(method, settings)
    try:
        return CoMoEConfig.from_dict(settings)
    except ValueError:
        return trained


def method_adapter(method: str, adapter: CoMoEConfig | Mapping[str, Any]) -> CoMoEConfig:
    """The adapter config that ``method`` trains from the given adapter settings (the fields its entry in
    `comoe.training.methods.METHODS` fixes set), validated. Errors name the field as ``adapter.NAME``."""
    settings = method_of(method).trained_settings(_settings_of(adapter))
    try:
        return CoMoEConfig.from_dict(settings)
    except ValueError as err:
        message = str(err)
        if message.startswith("unknown "):  # unknown_fields' message: no field to prefix
            raise
        starts_with_field = any(message.startswith(f"{name} ") for name in ADAPTER_FIELDS)
        raise ValueError(f"adapter.{message}" if starts_with_field else f"adapter: {message}") from None


def method_overrides(method: str, given: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The adapter settings in ``given`` that ``method`` replaces with another value, as
    ``{name: (given value, the value the method trains with)}``: moe-lora's contrastive_weight, soft-moe's
    routing, ... (see `method_adapter`). Empty for comoe, which trains the settings as given."""
    settings = _settings_of(given)
    trained = method_adapter(method, settings)
    return {
        name: (settings[name], getattr(trained, name))
        for name in FIXED_FIELDS
        if name in settings and settings[name] != getattr(trained, name)
    }


def split_names(name: str, value: Any) -> Any:
    """A comma-separated string of names as a list (``'a, b'`` → ``['a', 'b']``); 'all-linear' stays a string."""
    if not isinstance(value, str):
        return value
    if name == "target_modules" and value.strip() == ALL_LINEAR:
        return ALL_LINEAR
    return [part.strip() for part in value.split(",") if part.strip()]
