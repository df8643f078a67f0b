"""`comoe analyze`: do the experts specialise? Routing records, metrics, figures and a report.

``metrics`` holds the pure numbers, ``routing`` runs an adapter with records on, ``report`` and ``plots``
write the figures and ``report.md``, ``analyze`` ties them together.
"""

from comoe.analysis.analyze import analyze
from comoe.analysis.routing import AnalyzeOptions, NotAnalysable

__all__ = ["AnalyzeOptions", "NotAnalysable", "analyze"]
