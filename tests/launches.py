"""`accelerate launch` of `comoe` on 2 CPU processes (gloo), for the sharded-training tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_runs import read_log

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


def assert_trains_one_process_adapter(
    run_dir: Path, one_process_dir: Path, steps: int, relative_error: float | None = None
) -> None:
    """A 2-process run trained the adapter the one-process run trained (the same global batch): fp32
    tensors within rtol 1e-4 element by element (or, given ``relative_error``, each tensor's difference
    within that fraction of its norm, and the gradient norms within it too), every step logged with
    λ > 0, the same gradient norms."""
    sharded, single = saved_adapter(run_dir), saved_adapter(one_process_dir)
    assert sharded.keys() == single.keys() and len(sharded) > 0
    for name, tensor in single.items():
        assert sharded[name].dtype == torch.float32, name
        if relative_error is None:
            torch.testing.assert_close(
                sharded[name], tensor, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
            )
        else:
            error = float((sharded[name] - tensor).norm() / tensor.norm())
            assert error < relative_error, f"{name}: {error:.3g} of its norm apart"
    assert any(t.abs().sum() > 0 for n, t in sharded.items() if "comoe_B" in n)  # it trained
    log = read_log(run_dir)
    assert [row["step"] for row in log] == list(range(1, steps + 1))
    assert all(row["contrastive"] > 0 for row in log)  # λ > 0 under sharding
    norms = [row["grad_norm"] for row in read_log(one_process_dir)]
    assert [row["grad_norm"] for row in log] == pytest.approx(norms, rel=relative_error or 1e-4)
