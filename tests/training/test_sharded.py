"""Sharded training on 2 CPU processes (gloo): `comoe train` under FSDP2 through `accelerate launch` with
examples/accelerate/fsdp2.yaml (DeepSpeed ZeRO: test_zero.py).

One module-scoped set of launches serves every `comoe train` assertion: an FSDP2 run, the same run on
one process (the same global batch: grad_accum 2), and an FSDP2 run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.cli_runs import TASKS, comoe_cli, read_log
from tests.launches import (
    ACCELERATE_CONFIGS,
    assert_trains_one_process_adapter,
    check,
    killed_after,
    launch,
    saved_adapter,
)

pytestmark = pytest.mark.slow

FSDP2_CONFIG = ACCELERATE_CONFIGS / "fsdp2.yaml"
STEPS, SAVE_STEPS = 6, 2


def run_config(tmp: Path, model_dir: Path, adapter: str = "") -> Path:
    """A YAML file (accelerate launch would take `--r` for a flag of its own). No randomness that depends on
    how examples are split over processes (all anchors, no dropout), so one process and two agree."""
    path = tmp / "run.yaml"
    path.write_text(
        f"model: {model_dir}\ntasks: [{TASKS}]\ntrain_per_task: 24\ntest_per_task: 2\nbatch_size: 4\nr: 4\n"
        f"learning_rate: 5.0e-3\nmax_steps: {STEPS}\nsave_steps: {SAVE_STEPS}\neval_base: false\nbf16: true\n"
        f"lora_dropout: 0.0\nadapter: {{anchor: all, contrastive_weight: 0.1{adapter}}}\n"
    )
    return path


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sharded")
    config = run_config(tmp, tiny_model_dir)
    dirs = {name: tmp / name for name in ("fsdp", "one", "killed")}
    check(
        launch(FSDP2_CONFIG, "train", "--config", str(config), "--output-dir", str(dirs["fsdp"]), port=29531)
    )
    comoe_cli("train", "--config", str(config), "--grad-accum", "2", "--output-dir", str(dirs["one"]))
    killed = launch(
        FSDP2_CONFIG, "train", "--config", str(config), "--output-dir", str(dirs["killed"]), port=29532
    )
    killed_after(killed, dirs["killed"], SAVE_STEPS + 1)  # after the first checkpoint, before the end
    assert not (dirs["killed"] / "adapter").exists(), "killed too late: the run had finished"
    check(launch(FSDP2_CONFIG, "train", "--resume", str(dirs["killed"]), port=29533))
    return dirs


def test_fsdp2_trains_the_adapter_one_process_trains(runs):
    """The whole adapter, gathered from both ranks' shards (each holds other rows of every tensor, so a
    save of rank 0's shard alone fails this), fp32 on a bf16 base, equal to one process's on the same
    global batch; the run directory is complete."""
    assert_trains_one_process_adapter(runs["fsdp"], runs["one"], STEPS)
    metrics = json.loads((runs["fsdp"] / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2 and set(metrics["adapter"]["tasks"]) == set(TASKS.split(","))
    assert metrics["train"]["sharding"] == "fsdp2"


def test_fsdp2_checkpoints_hold_the_whole_state_and_resume_after_sigkill(runs):
    """The checkpoint holds the whole optimizer state (tensors of the adapter's shapes, not a shard) and
    both ranks' RNG states, as safetensors and JSON; a run killed with SIGKILL resumes to the adapter of the
    uninterrupted run, bit for bit."""
    (checkpoint,) = (runs["killed"] / "checkpoints").iterdir()
    assert {p.name for p in checkpoint.iterdir()} == {
        "adapter",
        "optimizer.safetensors",
        "rng.safetensors",
        "trainer_state.json",
    }
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    optimizer = load_file(checkpoint / "optimizer.safetensors")
    shapes = {name: tuple(t.shape) for name, t in saved_adapter(runs["fsdp"]).items()}
    for i, name in enumerate(state["parameters"]):
        assert tuple(optimizer[f"{i}.exp_avg"].shape) == shapes[name.replace(".default", "")], name
    assert {"torch_cpu", "rank1.torch_cpu"} <= set(load_file(checkpoint / "rng.safetensors"))
    assert set(state["rng_by_rank"]) == {"1"}

    straight, resumed = saved_adapter(runs["fsdp"]), saved_adapter(runs["killed"])
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [row["step"] for row in read_log(runs["killed"])] == list(range(1, STEPS + 1))
    summary = json.loads((runs["killed"] / "metrics.json").read_text())["train"]
    assert summary["resumed_at_step"] in range(SAVE_STEPS, STEPS, SAVE_STEPS)
