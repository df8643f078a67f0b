"""`comoe analyze RUN_DIR [RUN_DIR ...]` as a function: do the experts specialise? Metrics, plots and a report.

The metric definitions are in :mod:`comoe.analysis.metrics`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from comoe.analysis.figures import make_figures
from comoe.analysis.metrics import DEFINITIONS
from comoe.analysis.options import AnalyzeOptions, analysis_threads
from comoe.analysis.report_md import report_markdown
from comoe.analysis.run_metrics import NotAnalysable, analyse_run, skip_reason
from comoe.utils.deprecation import moved_names
from comoe.utils.files import write_json_atomic, write_text_atomic

REPORT_NAME = "report.md"
ROUTING_METRICS_NAME = "metrics.json"  # the routing metrics of every run analysed, with definitions


# --- the command --------------------------------------------------------------------------------------
def _unique_labels(runs: list[dict]) -> None:
    """Disambiguate equal labels with the run directory's name, then with a number."""
    for key in (lambda r: Path(r["run_dir"]).name, lambda r: str(runs.index(r) + 1)):
        counts = defaultdict(int)
        for r in runs:
            counts[r["label"]] += 1
        for r in runs:
            if counts[r["label"]] > 1:
                r["label"] = f"{r['label']} ({key(r)})"


def default_out_dir(run_dirs: Sequence[Path]) -> Path:
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / "analysis"
    return Path(f"analysis-compare-{time.strftime('%Y%m%d-%H%M%S')}")


def analyze(
    run_dirs: Sequence[str | Path], out: str | Path | None = None, options: AnalyzeOptions | None = None
) -> dict:
    """Analyse each run, write the PNGs, ``report.md`` and ``metrics.json`` to ``out``; returns the payload.

    Runs without routers are skipped with their reason (in the report too); if none is left this raises
    ``NotAnalysable``.
    """
    options = options or AnalyzeOptions()
    started = time.time()
    with analysis_threads(options.threads) as threads:
        runs, projections, skipped = _analyse_all([Path(d) for d in run_dirs], options)
    out = Path(out) if out is not None else default_out_dir([Path(d) for d in run_dirs])
    out.mkdir(parents=True, exist_ok=True)
    print(f"writing figures to {out}/", flush=True)
    files = make_figures(runs, projections, out)
    payload = {
        "runs": runs,
        "skipped": skipped,
        "options": asdict(options),
        "threads": threads,
        "definitions": DEFINITIONS,
        "figures": files,
        "seconds": time.time() - started,
    }
    write_json_atomic(out / ROUTING_METRICS_NAME, payload, indent=1)
    write_text_atomic(out / REPORT_NAME, report_markdown(payload, files))
    print(
        f"analysis written to {out}/ ({REPORT_NAME}, {ROUTING_METRICS_NAME}, {sum(map(len, files.values()))} figures) "
        f"in {payload['seconds']:.0f} s"
    )
    return payload


def _analyse_all(
    run_dirs: list[Path], options: AnalyzeOptions
) -> tuple[list[dict], list[dict | None], list[dict]]:
    """(metrics per analysed run, their projection data, skipped runs with reasons)."""
    runs, projections, skipped = [], [], []
    for run_dir in run_dirs:
        reason = skip_reason(run_dir)
        if reason is None:
            try:
                metrics, projection = analyse_run(run_dir, options)
            except NotAnalysable as err:
                reason = str(err)
        if reason is not None:
            print(f"comoe analyze: skipping {run_dir}: {reason}")
            skipped.append({"run_dir": str(run_dir), "reason": reason})
            continue
        runs.append(metrics)
        projections.append(projection)
    if not runs:
        raise NotAnalysable(
            "nothing to analyse: " + "; ".join(f"{s['run_dir']}: {s['reason']}" for s in skipped)
        )
    _unique_labels(runs)
    return runs, projections, skipped


# a name that lived here before comoe 0.2 (see comoe.utils.deprecation)
__getattr__ = moved_names(__name__, {"METRICS_NAME": "comoe.analysis.analyze:ROUTING_METRICS_NAME"})
