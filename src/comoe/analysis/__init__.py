"""`comoe analyze`: do the experts specialise? Routing records, metrics, figures and a report.

``options`` holds what `comoe analyze` does, ``record`` runs a trained adapter over its test sets with
routing records on, ``metrics`` holds the pure numbers, ``run_metrics`` computes them for one run,
``figures`` (with ``plots``) and ``report_md`` write the PNGs and ``report.md``, ``analyze`` ties them
together.
"""

from comoe.analysis.analyze import analyze
from comoe.analysis.options import AnalyzeOptions
from comoe.analysis.run_metrics import NotAnalysable

__all__ = ["AnalyzeOptions", "NotAnalysable", "analyze"]


def __getattr__(name: str):
    """The names of the old single-module ``comoe.analysis``, with a FutureWarning naming their new module."""
    from comoe.moved import ANALYSIS_MODULES, moved_attribute

    value = globals()[name] = moved_attribute(__name__, name, ANALYSIS_MODULES)  # warned once
    return value
