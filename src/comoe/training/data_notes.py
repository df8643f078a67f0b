"""What a run says about its data: the warnings printed before training (skipped lines, training examples
that are also test examples) and the block ``metrics.json`` records of them."""

from __future__ import annotations

import sys

from comoe.data.registry import RunData
from comoe.data.schema import Example

SHOWN = 5  # line numbers shown per warning


def print_data_warnings(data: RunData) -> None:
    """Print the skipped lines and the training examples that are also test examples (see `load_run_data`)."""
    if data.skipped:
        print(f"warning: skipped {len(data.skipped)} invalid lines (--skip-invalid-rows):", file=sys.stderr)
        for message in data.skipped:
            print(f"  {message}", file=sys.stderr)
    for task, pairs in data.overlap.items():
        lines = ", ".join(f"{_line(ex)} (test line {_line(same)})" for ex, same in pairs[:SHOWN])
        more = f", ... ({len(pairs) - SHOWN} more)" if len(pairs) > SHOWN else ""
        where = f"train lines {lines}{more} of {data.origin[task]}"
        if data.dropped_overlap:
            print(
                f"note: task {task!r}: dropped {len(pairs)} training examples that are also test examples "
                f"(same question and options: {where}) (--drop-test-overlap)",
                file=sys.stderr,
            )
        else:
            print(
                f"warning: task {task!r}: {len(pairs)} of {len(data.train[task])} training examples are also "
                f"test examples (same question and options: {where}); its test score counts examples the "
                "adapter trained on: --drop-test-overlap drops them from training",
                file=sys.stderr,
            )


def data_summary(data: RunData) -> dict:
    """What ``metrics.json`` records of the data: the skipped lines, the train/test overlap per task."""
    return {
        "skipped_rows": {"count": len(data.skipped), "lines": data.skipped},
        "train_test_overlap": {task: len(pairs) for task, pairs in data.overlap.items()},
        "test_overlap_dropped": data.dropped_overlap,
    }


def _line(example: Example) -> str:
    return "?" if example.line is None else str(example.line)
