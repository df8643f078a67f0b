"""The runnable examples in examples/ (Trainer through PEFT, TRL's SFTTrainer), run as a user runs them,
on a tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from comoe.config import CONFIG_NAME, WEIGHTS_NAME

pytestmark = pytest.mark.slow  # every test here runs the examples end to end

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, model_dir: Path, out: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / name),
            "--model",
            str(model_dir),
            "--max-steps",
            "3",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert (out / CONFIG_NAME).is_file() and (out / WEIGHTS_NAME).is_file()
    assert all(
        key.rsplit(".", 1)[-1] in {"comoe_A", "comoe_B", "comoe_router"}
        for key in load_file(out / WEIGHTS_NAME)
    )
    return result.stdout


def test_trainer_example(tiny_model_dir, tmp_path):
    out = run_example("trainer.py", tiny_model_dir, tmp_path / "trainer")
    assert "PeftModel.from_pretrained reproduces the logits exactly: True" in out


def test_sft_example(tiny_model_dir, tmp_path):
    pytest.importorskip("trl")
    out = run_example("sft.py", tiny_model_dir, tmp_path / "sft")
    assert "8 CoMoE layers" in out and "last training contrastive loss" in out
