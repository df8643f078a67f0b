"""Tasks as lists of :class:`Example`: the built-in offline suite, the paper's benchmarks, JSONL files."""

import warnings

from comoe.data.jsonl import DataError, read_jsonl
from comoe.data.registry import DEFAULT_SUITE_TASKS, PAPER_BENCHMARKS, list_tasks, load_task
from comoe.data.schema import Example

__all__ = [
    "DEFAULT_SUITE_TASKS",
    "PAPER_BENCHMARKS",
    "DataError",
    "Example",
    "list_tasks",
    "load_task",
    "read_jsonl",
]

_RENAMED = {"BUILTIN_SUITE": "DEFAULT_SUITE_TASKS"}  # old name -> new name, for one minor release


def __getattr__(name: str):
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(
            f"comoe.data.{name} is deprecated and goes in the next minor release: use comoe.data.{new}",
            FutureWarning,
            stacklevel=2,
        )
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
