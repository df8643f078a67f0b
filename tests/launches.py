"""`accelerate launch` of `comoe` on 2 CPU processes (gloo), for the sharded-training tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


def launch(config_file: Path, *args: str, port: int, launcher: tuple[str, ...] = ()) -> list[str]:
    """The command that runs `comoe *args` under ``accelerate launch --config_file config_file *launcher``."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config_file),
        "--main_process_port",
        str(port),
        *launcher,
        "-m",
        "comoe",
        *args,
    ]


def launch_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def check(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env=launch_env(), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def killed_after(cmd: list[str], run_dir: Path, steps: int) -> None:
    """Start ``cmd`` in its own process group and SIGKILL the whole group once ``steps`` steps are logged."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=launch_env(), start_new_session=True
    )
    log, deadline = run_dir / "train_log.jsonl", time.time() + 300
    try:
        while not (log.is_file() and len(log.read_text().splitlines()) >= steps):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.time() < deadline, "the run logged too few steps"
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def saved_adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")
