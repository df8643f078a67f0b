"""A `comoe train` run beside a busy process: seconds per step on an idle machine and beside one process
that keeps a core busy, with torch's threads fixed at the core count (``--cpu-threads N``, torch's own
default) and with comoe's default (one thread per core the other processes leave free).

Each variant is its own `comoe train` process (a thread count and OpenMP's state are per process); the
competitor is a Python busy loop. Per step: the median of the steps' wall times after the first two,
from ``train_log.jsonl``. The ratios busy/idle say how much a competing process slows a run:

    .venv/bin/python benchmarks/busy_machine.py --out benchmarks/results/busy-machine.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from comoe.utils.machine import machine_info

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
TASKS = f"jsonl:{EXAMPLES / 'sentiment.jsonl'},jsonl:{EXAMPLES / 'capitals.jsonl'}"


def step_seconds(steps: int, threads: int | None, work: Path) -> tuple[float, list[int]]:
    """(median seconds per step after the first two, the thread count of each step) of one short run."""
    run_dir = work / f"run-{time.monotonic_ns()}"
    cmd = [
        sys.executable, "-m", "comoe", "train", "--tasks", TASKS, "--max-steps", str(steps),
        "--test-per-task", "1", "--eval-base", "false", "--output-dir", str(run_dir),
    ]  # fmt: skip
    if threads is not None:
        cmd += ["--cpu-threads", str(threads)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows]
    per_step = [b - a for a, b in zip(elapsed[1:], elapsed[2:], strict=False)]
    return statistics.median(per_step), [row.get("threads") for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="optimiser steps per run (default 10)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    variants = {"fixed": cores, "comoe": None}  # --cpu-threads: the core count, or comoe's default
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for load in ("idle", "busy"):
            competitor = None
            if load == "busy":
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                for name, threads in variants.items():
                    seconds, counts = step_seconds(args.steps, threads, Path(tmp))
                    results[f"{load}/{name}"] = {"seconds_per_step": round(seconds, 3), "threads": counts}
                    print(f"{load:5s} {name:6s} {seconds:7.2f} s/step  threads {counts}", flush=True)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
    slowdown = {
        name: round(
            results[f"busy/{name}"]["seconds_per_step"] / results[f"idle/{name}"]["seconds_per_step"], 2
        )
        for name in variants
    }
    print("busy/idle: " + ", ".join(f"{name} {ratio}×" for name, ratio in slowdown.items()))
    report = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": machine_info(__import__("torch").device("cpu")),
        "cores": cores,
        "steps": args.steps,
        "results": results,
        "busy_over_idle": slowdown,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
