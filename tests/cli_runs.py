"""Running the real `comoe` command line from tests, and reading what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TASKS = "strategyqa,social_iqa"


def comoe_cli(*args: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "comoe", *args], capture_output=True, text=True, env=env, timeout=600, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(f"comoe {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def tiny_run_flags(model_dir: Path, tasks: str = TASKS, train: int = 8, test: int = 4) -> list[str]:
    """The flags of a seconds-long run on the tiny model: few examples, batch 4, rank 4."""
    return [
        "--model",
        str(model_dir),
        "--tasks",
        tasks,
        "--train-per-task",
        str(train),
        "--test-per-task",
        str(test),
        "--batch-size",
        "4",
        "--r",
        "4",
    ]


def go_offline(monkeypatch) -> None:
    """The hub offline flags, as a process started with them sees them: ``datasets`` and ``huggingface_hub``
    read them once, at import (set later, they would retry the network for ~20 s before failing)."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
