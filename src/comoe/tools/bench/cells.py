"""Table cells of the `comoe bench` Markdown: numbers, ratios with their quartile band, target values."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def number(x, digits: int = 2, suffix: str = "") -> str:
    """``x`` to ``digits`` decimals with ``suffix``; "–" for a missing or NaN figure."""
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return f"{x:.{digits}f}{suffix}"


def verdict(met: bool | None) -> str:
    """A target's result cell: met, MISSED, or "–" where it was not judged."""
    return "–" if met is None else ("**met**" if met else "**MISSED**")


def times(value) -> str:
    """A ratio cell: 1.23×."""
    return number(value, 2, "×")


def target_value(t: dict) -> str:
    """A judged target's measured figure, or why it fails."""
    v = t["value"]
    if v is None:
        note = t.get("note") or ""
        return ("fails: " + note[:110] + ("…" if len(note) > 110 else "")) if note else "–"
    text = f"{100 * v:+.1f} %" if target_unit(t) == "%" else f"{v:.2f}×"
    return text + (f" ({t['note']})" if t.get("note") else "")


def target_threshold(t: dict) -> str:
    """A judged target's threshold with its direction."""
    if not t["threshold"]:
        return "works, matches"
    sign = "≥" if t.get("at_least") else "≤"
    return f"{sign} {100 * t['threshold']:.0f} %" if target_unit(t) == "%" else f"{sign} {t['threshold']}×"


def target_unit(t: dict) -> str:
    """ "%" or "x"; results written before targets carried a unit name theirs in the target's text."""
    return t.get("unit") or ("%" if "10 %" in t["target"] else "x")


def ratio_band(rows: dict, name: str, ref: str | None) -> tuple[float, float] | None:
    """Quartiles of the per-round time ratios name/ref (the rounds are paired by position)."""
    if ref not in rows or name == ref:
        return None
    ratios = [a / b for a, b in zip(rows[name]["times_ms"], rows[ref]["times_ms"], strict=True)]
    if len(ratios) < 4:
        return None
    q = statistics.quantiles(ratios, n=4)
    return q[0], q[2]


def ratio_cell(value: float | None, band: tuple[float, float] | None) -> str:
    """A ratio with its quartile band in brackets."""
    if value is None:
        return "–"
    return f"{value:.2f}× ({band[0]:.2f}–{band[1]:.2f})" if band else f"{value:.2f}×"


def target_table(targets: Iterable[dict]) -> list[str]:
    """The judged targets as a Markdown table: target, where, measured, threshold, result."""
    lines = ["| target | where | measured | threshold | result |", "|---|---|---|---|---|"]
    for t in targets:
        lines.append(
            f"| {t['target']} | {t['where']} | {target_value(t)} | {target_threshold(t)} | {verdict(t['met'])} |"
        )
    return lines
