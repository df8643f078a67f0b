"""DeepSpeed ZeRO on 2 CPU processes (gloo, DeepSpeed's CPU accelerator): `comoe train` through
`accelerate launch` with examples/accelerate/zero2.yaml and zero3.yaml (the latter with a DeepSpeed config
file added), and the launch settings comoe refuses.

One module-scoped set of launches: a ZeRO-2 run (bf16 base) and a ZeRO-3 run (fp32), each beside the same
run on one process (the same global batch), and a ZeRO-3 run killed with SIGKILL and resumed. The ZeRO-3
config partitions every tensor (``stage3_param_persistence_threshold: 0``; DeepSpeed's default keeps
tensors under 100k elements whole, which would leave this tiny adapter unpartitioned).

The runs log routing health every step: its hooks on the routers turn off the fused routing kernel
(``comoe.fused``) as ZeRO-3's hooks do, so one process runs the ops ZeRO-3 runs. ZeRO-3 computes on
gathered copies and reduces gradients in another order, which differs from one process in the last bit;
the contrastive term's norm floor is raised (``norm_eps: 1e-2``) because at the default 1e-6 its gradient
spikes at step 2 and turns last-bit differences into percent ones within six steps (ZeRO-2 and FSDP2, whose
products are one process's, are unaffected), and ZeRO-3 is compared in fp32, where last bits are 2^-24.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comoe.training.zero import ZeroPlan, deepspeed_config, zero_launch
from tests.cli_runs import comoe_cli, read_log
from tests.launches import (
    ACCELERATE_CONFIGS,
    assert_trains_one_process_adapter,
    check,
    killed_after,
    launch,
    saved_adapter,
)
from tests.training.test_sharded import SAVE_STEPS, STEPS, run_config

pytest.importorskip("deepspeed")

ZERO3_FILE = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _zero3_file(tmp: Path) -> tuple[str, ...]:
    """accelerate launch's flag that adds a DeepSpeed config file to examples/accelerate/zero3.yaml."""
    (tmp / "zero3.json").write_text(json.dumps(ZERO3_FILE))
    return ("--deepspeed_config_file", str(tmp / "zero3.json"))


def _configs(tmp: Path, model_dir: Path) -> dict[str, Path]:
    """The run's YAML files: bf16 (ZeRO-2) and fp32 (ZeRO-3)."""
    bf16 = run_config(tmp, model_dir, ", norm_eps: 1.0e-2")
    bf16.write_text(bf16.read_text() + "routing_health_steps: 1\n")
    fp32 = tmp / "fp32.yaml"
    fp32.write_text(bf16.read_text().replace("bf16: true", "bf16: false"))
    return {"bf16": bf16, "fp32": fp32}


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("zero")
    configs, zero3, file = _configs(tmp, tiny_model_dir), ACCELERATE_CONFIGS / "zero3.yaml", _zero3_file(tmp)
    dirs = {name: tmp / name for name in ("zero2", "one-bf16", "zero3", "one-fp32", "killed")}

    def train(precision: str, name: str) -> tuple[str, ...]:
        return ("train", "--config", str(configs[precision]), "--output-dir", str(dirs[name]))

    check(launch(ACCELERATE_CONFIGS / "zero2.yaml", *train("bf16", "zero2"), port=29541))
    check(launch(zero3, *train("fp32", "zero3"), port=29542, launcher=file))
    comoe_cli(*train("bf16", "one-bf16"), "--grad-accum", "2")
    comoe_cli(*train("fp32", "one-fp32"), "--grad-accum", "2")
    killed = launch(zero3, *train("fp32", "killed"), port=29543, launcher=file)
    killed_after(killed, dirs["killed"], SAVE_STEPS + 1)
    assert not (dirs["killed"] / "adapter").exists(), "killed too late: the run had finished"
    check(launch(zero3, "train", "--resume", str(dirs["killed"]), port=29544, launcher=file))
    return dirs


@pytest.mark.slow
@pytest.mark.parametrize("stage, one", [("zero2", "one-bf16"), ("zero3", "one-fp32")])
def test_zero_trains_the_adapter_one_process_trains(runs, stage, one):
    """The whole fp32 adapter, gathered from both ranks' partitions, equal to one process's on the same
    global batch with λ > 0 (ZeRO-2 on a bf16 base); the run directory is complete."""
    assert_trains_one_process_adapter(runs[stage], runs[one], STEPS)
    assert json.loads((runs[stage] / "metrics.json").read_text())["train"]["processes"] == 2


@pytest.mark.slow
def test_zero3_checkpoints_hold_the_whole_state_and_resume_after_sigkill(runs):
    """The checkpoint holds whole optimizer tensors (the adapter's shapes, not a partition) in the files an
    unsharded run writes; a ZeRO-3 run killed with SIGKILL resumes to the uninterrupted run's adapter, bit
    for bit (its learning rate and AdamW moments restored)."""
    (checkpoint,) = (runs["killed"] / "checkpoints").iterdir()
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    optimizer = load_file(checkpoint / "optimizer.safetensors")
    shapes = {name: tuple(t.shape) for name, t in saved_adapter(runs["zero3"]).items()}
    for i, name in enumerate(state["parameters"]):
        assert tuple(optimizer[f"{i}.exp_avg"].shape) == shapes[name.replace(".default", "")], name
        assert float(optimizer[f"{i}.exp_avg_sq"].abs().sum()) > 0, name
    assert set(state["rng_by_rank"]) == {"1"}
    straight, resumed = saved_adapter(runs["zero3"]), saved_adapter(runs["killed"])
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    assert [row["step"] for row in read_log(runs["killed"])] == list(range(1, STEPS + 1))


def _env(**settings: str) -> dict[str, str]:
    return {"ACCELERATE_USE_DEEPSPEED": "true", **settings}


def test_zero_launch_reads_accelerates_settings_and_a_config_file(tmp_path):
    assert zero_launch({}) is None
    plan = zero_launch(
        _env(ACCELERATE_DEEPSPEED_ZERO_STAGE="3", ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE="cpu")
    )
    assert plan == ZeroPlan(stage=3, offload_optimizer="cpu")
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto", "overlap_comm": True}})
    )
    plan = zero_launch(_env(ACCELERATE_DEEPSPEED_CONFIG_FILE=str(path)))
    assert plan == ZeroPlan(stage=2, extra={"overlap_comm": True})
    config = deepspeed_config(plan, micro_batch_size=4, grad_accum=2, max_grad_norm=None)
    assert (
        config["zero_optimization"] == {"overlap_comm": True, "stage": 2}
        and config["gradient_clipping"] == 0.0
    )
    assert config["gradient_accumulation_steps"] == 2 and config["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize(
    "settings, file, named",
    [
        ({"ACCELERATE_DEEPSPEED_ZERO_STAGE": "0"}, None, "ddp.yaml"),
        ({"ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE": "nvme"}, None, "offload_param_device"),
        ({"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, None, "zero3_init_flag"),
        ({}, {"optimizer": {"type": "AdamW"}}, "remove optimizer"),
        ({}, {"bf16": {"enabled": True}}, "remove bf16"),
        ({}, "{not json", "ds.json"),
    ],
)
def test_zero_launch_refuses_what_comoe_cannot_follow(tmp_path, settings, file, named):
    if file is not None:
        path = tmp_path / "ds.json"
        path.write_text(file if isinstance(file, str) else json.dumps(file))
        settings = {**settings, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    with pytest.raises(ValueError, match=named):
        zero_launch(_env(**settings))
