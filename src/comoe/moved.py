"""Old module paths that still import, for one release, each with a ``FutureWarning`` naming the new home.

comoe's tooling moved from top-level modules (``comoe.adapters``, ``comoe.train``, ``comoe.runconfig``,
...) into layered subpackages (``comoe.training``, ``comoe.evaluation``, ...). ``import comoe`` puts
``MovedModuleFinder`` at the end of ``sys.meta_path``: an old path then imports as a small alias module
whose attributes are looked up, on first use, in the modules that now hold them; each name read through
an alias warns once (the first time) with its new full name. Nothing is imported until an old path is: ``import comoe``
still loads the library alone. The targets are module names as strings, so the aliases sit outside the
import layers (tests/test_layout.py).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

# old module -> the modules that hold its public names now, searched in order (the first is its new home)
MOVED: dict[str, tuple[str, ...]] = {
    "comoe.adapters": ("comoe.training.adapters",),
    "comoe.models": ("comoe.training.base_models",),
    "comoe.checkpoint": ("comoe.training.checkpoint",),
    "comoe.job": ("comoe.training.job", "comoe.data.registry", "comoe.training.run_config"),
    "comoe.train": ("comoe.training.loop",),
    "comoe.runconfig": ("comoe.training.run_config", "comoe.cli.train"),
    "comoe.validation": ("comoe.utils.validation",),
    "comoe.files": ("comoe.utils.files",),
    "comoe.batching": ("comoe.data.batching",),
    "comoe.data.bigbench": ("comoe.data.suites", "comoe.tools.suite_builder"),
    "comoe.evaluate": (
        "comoe.evaluation.scoring",
        "comoe.evaluation.multiple_choice",
        "comoe.evaluation.generation",
        "comoe.evaluation.batches",
    ),
    "comoe.report": ("comoe.evaluation.accuracy_table",),
    "comoe.plots": ("comoe.analysis.plots",),
    "comoe.compare": (
        "comoe.experiments.compare",
        "comoe.experiments.grid",
        "comoe.experiments.stats",
        "comoe.experiments.summary",
        "comoe.cli.compare",
    ),
    "comoe.bench": (
        "comoe.tools.bench",
        "comoe.tools.bench.run",
        "comoe.tools.bench.variants",
        "comoe.tools.bench.measure",
        "comoe.tools.bench.sizes",
        "comoe.tools.bench.naive",
        "comoe.tools.bench.render",
        "comoe.tools.bench.case",
        "comoe.tools.bench.thresholds",
        "comoe.tools.bench.results_files",
        "comoe.tools.bench.cells",
        "comoe.tools.bench.run_page",
        "comoe.tools.bench.summary_table",
        "comoe.tools.bench.peers_page",
        "comoe.tools.bench.compile_check",
        "comoe.utils.machine",
        "comoe.cli.bench",
    ),
}

# ``comoe.analysis`` was one module and is now a package: its old names, looked up by the package
ANALYSIS_MODULES = (
    "comoe.analysis.metrics",
    "comoe.analysis.options",
    "comoe.analysis.record",
    "comoe.analysis.run_metrics",
    "comoe.analysis.figures",
    "comoe.analysis.report_md",
    "comoe.analysis.plots",
    "comoe.analysis.analyze",
)

# (old module, old name) -> the name it has now, where it was renamed as well as moved
RENAMED: dict[tuple[str, str], str] = {
    ("comoe.compare", "summarise"): "summarise_grid",
    ("comoe.evaluate", "summarise"): "with_macro_average",
    ("comoe.evaluate", "PROTOCOLS"): "MULTIPLE_CHOICE_PROTOCOLS",
}


def moved_attribute(old: str, name: str, homes: tuple[str, ...]) -> Any:
    """``name`` as the first of ``homes`` that defines it, with a FutureWarning naming where it lives now."""
    if name.startswith("__"):
        raise AttributeError(name)
    new_name = RENAMED.get((old, name), name)
    for home in homes:
        module = importlib.import_module(home)
        if hasattr(module, new_name):
            warnings.warn(
                f"{old}.{name} is deprecated and goes in the next release: use {home}.{new_name}",
                FutureWarning,
                stacklevel=3,
            )
            return getattr(module, new_name)
    raise AttributeError(
        f"module {old!r} has no attribute {name!r} (its names now live in {', '.join(homes)})"
    )


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports each old path of ``MOVED`` as an alias module; every other name is left to the next finder."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec) -> None:
        return None  # the default module

    def exec_module(self, module: ModuleType) -> None:
        old, homes = module.__name__, MOVED[module.__name__]
        module.__doc__ = f"Deprecated alias: {old} moved to {homes[0]}; import from there."

        def __getattr__(name: str) -> Any:
            value = moved_attribute(old, name, homes)
            setattr(module, name, value)  # found once, warned once
            return value

        module.__getattr__ = __getattr__


def install() -> None:
    """Put the finder at the end of ``sys.meta_path`` (idempotent)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
