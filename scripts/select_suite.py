#!/usr/bin/env python
"""Measure which candidate tasks SmolLM2 learns, on a validation split carved out of their TRAIN split.

    python scripts/select_suite.py prepare --sdist /tmp/bb/bigbench-1.0.0.tar.gz --work /tmp/select
    python scripts/select_suite.py run --work /tmp/select --tasks intent_recognition,color_hex \\
        --label mix-a -- --train-per-task 200 --test-per-task 100 --max-steps 150 --learning-rate 1e-3

``prepare`` converts every candidate of comoe.data.suites.LEARNABLE_CANDIDATES (and the shipped tasks)
from the sdist with the suite's own rules, keeps only each task's train split, and holds out a fixed
VALIDATION_SHARE of its inputs (ordered by SHA-1 of task name + normalised input) as validation. It writes
``WORK/data/<task>.jsonl`` whose "train" lines are the rest of train and whose "test" lines are the
validation examples: the suite's test split is never read, so nothing chosen here has seen it.

``run`` trains with ``comoe train --tasks jsonl:WORK/data/a.jsonl,...`` (one torch thread, the arguments
after ``--`` passed on; ``--eval-base false`` unless you pass ``--eval-base true``) and appends the
command, per-task validation accuracy, the majority class and the seconds to
``results/suite-selection/runs.jsonl``; ``table`` prints that log as the markdown table in
``results/suite-selection/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from comoe.data.suites import (
    LEARNABLE_CANDIDATES,
    SUITE_TASKS,
    normalize_space,
)
from comoe.tools.suite_builder import (
    assign_splits,
    convert_examples,
    dump_jsonl,
    read_task_files,
)

REPO = Path(__file__).resolve().parents[1]
LOG = REPO / "results" / "suite-selection" / "runs.jsonl"
VALIDATION_SHARE = 0.2


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def carve_validation(task_name: str, train: list[dict], share: float = VALIDATION_SHARE) -> list[dict]:
    """Train records -> the same records with split "train" (kept) or "test" (validation).

    Whole inputs go to validation (no input in both), the first ``share`` of the distinct normalised inputs
    ordered by SHA-1 of task name + input; independent of the record order.
    """
    keys = sorted(
        {normalize_space(r["question"]).lower() for r in train}, key=lambda k: _sha1(f"{task_name}\x00{k}")
    )
    held = set(keys[: max(1, int(share * len(keys)))])
    out = []
    for split in ("train", "test"):
        for r in train:
            if (normalize_space(r["question"]).lower() in held) == (split == "test"):
                out.append({**r, "split": split})
    return out


def prepare(sdist: Path, work: Path) -> None:
    tasks = {t.name: t for t in LEARNABLE_CANDIDATES + SUITE_TASKS}.values()
    raw = read_task_files(sdist, sorted({t.path for t in tasks}))
    (work / "data").mkdir(parents=True, exist_ok=True)
    for task in tasks:
        records, _ = convert_examples(task, raw[task.path]["examples"])
        train = [r for r in assign_splits(task, records) if r["split"] == "train"]
        rows = carve_validation(task.name, train)
        (work / "data" / f"{task.name}.jsonl").write_text(dump_jsonl(rows), encoding="utf-8")
        counts = Counter(r["split"] for r in rows)
        val = Counter(r["answer"] for r in rows if r["split"] == "test")
        print(
            f"{task.name:28s} train {counts['train']:5d}  validation {counts['test']:4d}  "
            f"validation majority {max(val.values()) / counts['test']:.3f}",
            file=sys.stderr,
        )


def run(work: Path, tasks: list[str], label: str, extra: list[str]) -> dict:
    specs = ",".join(f"jsonl:{work / 'data' / f'{name}.jsonl'}" for name in tasks)
    out_dir = work / "runs" / label
    cmd = [str(REPO / ".venv" / "bin" / "comoe"), "train", "--tasks", specs, "--output-dir", str(out_dir)]
    if "--eval-base" not in extra:
        cmd += ["--eval-base", "false"]
    cmd += extra
    threads = os.environ.get("SELECT_THREADS", "1")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    started = time.time()
    subprocess.run(cmd, check=True, env=env)
    seconds = time.time() - started
    metrics = json.loads((out_dir / "metrics.json").read_text())
    shown = " ".join(shlex.quote(c) for c in ["comoe", "train", "--tasks", ",".join(tasks), *cmd[6:]])
    record = {
        "label": label,
        "command": shown,
        "seconds_total": round(seconds, 1),
        "seconds_train": round(metrics["train_seconds"], 1),
        "steps": metrics["train"].get("steps"),
        "adapter": {t: r["accuracy"] for t, r in metrics["adapter"]["tasks"].items()},
        "majority": {t: r["accuracy"] for t, r in metrics["majority"]["tasks"].items()},
        "n": {t: r["n"] for t, r in metrics["adapter"]["tasks"].items()},
    }
    if "base" in metrics:
        record["base"] = {t: r["accuracy"] for t, r in metrics["base"]["tasks"].items()}
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(render_record(record))
    return record


def render_record(r: dict) -> str:
    lines = [
        f"#### `{r['label']}`: {r['seconds_total']:.0f} s in all, {r['seconds_train']:.0f} s training"
        f" ({r.get('steps')} steps)",
        "",
        f"`{r['command']}`",
        "",
        "| task | n | majority | "
        + ("zero-shot | " if "base" in r else "")
        + "adapter | adapter − majority |",
        "|---|---|---|" + ("---|" if "base" in r else "") + "---|---|",
    ]
    for t in r["adapter"]:
        base = f"{100 * r['base'][t]:.1f} | " if "base" in r else ""
        lines.append(
            f"| {t} | {r['n'][t]} | {100 * r['majority'][t]:.1f} | {base}{100 * r['adapter'][t]:.1f} | "
            f"{100 * (r['adapter'][t] - r['majority'][t]):+.1f} |"
        )
    avg = lambda d: 100 * sum(d.values()) / len(d)  # noqa: E731
    base = f"{avg(r['base']):.1f} | " if "base" in r else ""
    lines.append(
        f"| **average** | | {avg(r['majority']):.1f} | {base}{avg(r['adapter']):.1f} | "
        f"{avg(r['adapter']) - avg(r['majority']):+.1f} |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--sdist", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--tasks", required=True, help="comma-separated candidate names")
    r.add_argument("--label", required=True)
    sub.add_parser("table")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.sdist, args.work)
    elif args.command == "run":
        run(args.work, [t.strip() for t in args.tasks.split(",") if t.strip()], args.label, extra)
    else:
        for line in LOG.read_text().splitlines():
            print(render_record(json.loads(line)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
