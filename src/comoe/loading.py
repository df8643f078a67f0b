"""Loading adapter tensors: the one path both loaders take (``PeftModel.from_pretrained`` through the
tuner, and ``CoMoEModel``'s), every check before anything is copied."""

from __future__ import annotations

import torch
from torch import Tensor

from comoe.compat import upgraded_adapter_tensors

ADAPTER_PREFIX = "comoe_"  # every adapter tensor's name starts with it (PEFT's prefix for the method)
PEFT_PREFIX = "base_model.model."  # what PeftModel puts before the wrapped model's parameter names


class AdapterLoadError(ValueError):
    """An adapter file that cannot be loaded into this base model; nothing was changed."""


def fit_adapter_tensors(
    tensors: dict[str, Tensor], expected: dict[str, torch.Size], source: str
) -> dict[str, Tensor]:
    """The saved ``tensors`` keyed as the model keys them (``expected``: names and shapes), files of
    earlier versions upgraded (``comoe.compat``); raises AdapterLoadError unless they fit exactly."""
    prefix = PEFT_PREFIX if any(k.startswith(PEFT_PREFIX) for k in expected) else ""
    fitted = {prefix + key.removeprefix(PEFT_PREFIX): value for key, value in tensors.items()}
    fitted = upgraded_adapter_tensors(fitted, expected)
    check_adapter_tensors(fitted, expected, source)
    return fitted


def check_adapter_tensors(tensors: dict[str, Tensor], expected: dict[str, torch.Size], source: str) -> None:
    """Raise AdapterLoadError unless ``tensors`` has exactly the ``expected`` names and shapes, and every
    value is finite."""
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterLoadError(
            f"{source} does not fit this model: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected tensors {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}; nothing was loaded"
        )
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise AdapterLoadError(
                f"{source}: tensor {name} has shape {tuple(tensors[name].shape)} but this model expects "
                f"{tuple(shape)} (an adapter for a base of another shape?); nothing was loaded"
            )
    check_finite(tensors, source)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def check_finite(tensors: dict[str, Tensor], source: str) -> None:
    """Raise AdapterLoadError if any tensor holds NaN or Inf, naming the tensors and counting the values."""
    bad = {}
    for name, value in tensors.items():
        if value.is_floating_point() or value.is_complex():
            count = int((~torch.isfinite(value)).sum())
            if count:
                bad[name] = count
    if bad:
        names = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise AdapterLoadError(
            f"{source}: {_count(sum(bad.values()), 'non-finite value')} (NaN or Inf) in "
            f"{_count(len(bad), 'tensor')}: {names}{more}; "
            "nothing was loaded. A diverged run saved it, or the file is damaged: load an earlier checkpoint, "
            "or retrain with a lower learning rate"
        )
