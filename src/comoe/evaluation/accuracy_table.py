"""The accuracy table printed in the terminal after `comoe train` and `comoe eval` (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

COLUMNS = (("majority", "majority class"), ("base", "zero-shot base"), ("adapter", "adapter"))


def accuracy_rows(metrics: dict) -> list[tuple[str, dict[str, float | None], int]]:
    """(task, {column: accuracy}, n) for every task, then the macro average."""
    adapter = metrics.get("adapter") or metrics.get("base") or {}
    rows = []
    for task, scores in adapter.get("tasks", {}).items():
        cells = {key: _task_acc(metrics.get(key), task) for key, _ in COLUMNS}
        rows.append((task, cells, scores.get("n", 0)))
    averages = {key: (metrics.get(key) or {}).get("macro", {}).get("accuracy") for key, _ in COLUMNS}
    rows.append(("average", averages, sum(n for _, _, n in rows)))
    return rows


def _task_acc(block: dict | None, task: str) -> float | None:
    if not block:
        return None
    scores = block.get("tasks", {}).get(task)
    return None if scores is None else scores["accuracy"]


def print_accuracy_table(metrics: dict, title: str = "accuracy", console: Console | None = None) -> None:
    table = Table(title=title)
    table.add_column("task")
    table.add_column("n", justify="right")
    for _, header in COLUMNS:
        table.add_column(header, justify="right")
    for task, cells, n in accuracy_rows(metrics):
        shown = ["—" if cells[key] is None else f"{100 * cells[key]:.1f}" for key, _ in COLUMNS]
        table.add_row(task, str(n), *shown, style="bold" if task == "average" else None)
    (console or Console()).print(table)
    if metrics.get("trainable"):
        share = 100 * metrics["trainable"] / metrics["total_params"]
        (console or Console()).print(
            f"trainable parameters: {metrics['trainable']:,} ({share:.2f}% of {metrics['total_params']:,})"
        )
