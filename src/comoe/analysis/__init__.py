"""`comoe analyze`: do the experts specialise? Routing records, metrics, figures and a report.

``metrics`` holds the pure numbers, ``routing`` runs an adapter with records on, ``report`` and ``plots``
write the figures and ``report.md``, ``analyze`` ties them together.
"""

from comoe.analysis.analyze import analyze
from comoe.analysis.routing import AnalyzeOptions, NotAnalysable

__all__ = ["AnalyzeOptions", "NotAnalysable", "analyze"]


def __getattr__(name: str):
    """The names of the old single-module ``comoe.analysis``, with a FutureWarning naming their new module."""
    from comoe.moved import ANALYSIS_MODULES, moved_attribute

    value = globals()[name] = moved_attribute(__name__, name, ANALYSIS_MODULES)  # warned once
    return value
