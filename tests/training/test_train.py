"""`comoe train` / `comoe eval` end to end on a tiny Llama that uses SmolLM2's real tokenizer.

Runs go through the real command line in subprocesses (the way users run them), on two small built-in
tasks, so these tests cover data loading, batching, the accelerate loop, checkpoints, resume, DDP,
saving and evaluation together.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from comoe.training.run_config import RunConfig
from tests.cli_runs import TASKS, comoe_cli, read_log, tiny_run_flags

pytestmark = pytest.mark.slow  # every test here runs `comoe` end to end

ROOT = Path(__file__).resolve().parents[2]


def tiny_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--tasks",
        TASKS,
        "--train-per-task",
        "24",
        "--test-per-task",
        "8",
        "--batch-size",
        "4",
        "--r",
        "4",
        "--learning-rate",
        "5e-3",
        "--output-dir",
        str(out),
        *extra,
    ]


# λ > 0, routing health and validation on; a larger --norm-eps keeps the second step's contrastive gradient
# (B near zero) from a norm of ~1e4, after which float rounding would grow as in a chaotic run; every prompt
# is longer than --max-length (one sequence length: `--compile` compiles once)
EAGER_FLAGS = (
    *("--max-steps", "4", "--contrastive-weight", "0.1", "--max-length", "20", "--norm-eps", "1e-2"),
    *("--routing-health-steps", "2", "--val-per-task", "2", "--eval-steps", "2"),
)


@pytest.fixture(scope="module")
def eager_run(tiny_model_dir, tmp_path_factory) -> Path:
    """One eager `comoe train` run that two tests read: the complete run directory, and `--compile`'s
    reference."""
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    comoe_cli(*tiny_args(tiny_model_dir, run_dir, *EAGER_FLAGS))
    return run_dir


def test_train_writes_a_complete_run_directory_and_eval_reproduces_it(eager_run):
    run_dir = eager_run
    assert {p.name for p in (run_dir / "adapter").iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["adapter"]["tasks"]) == set(TASKS.split(","))
    assert {"majority", "base", "adapter", "trainable", "train"} <= set(metrics)
    log = read_log(run_dir)
    assert [row["step"] for row in log] == list(range(1, 5))
    assert all({"loss", "task", "contrastive"} <= set(row) for row in log)
    assert RunConfig.from_yaml(run_dir / "run_config.yaml").adapter.contrastive_weight == 0.1

    comoe_cli("eval", str(run_dir))
    again = json.loads((run_dir / "eval_label.json").read_text())
    for task, scores in metrics["adapter"]["tasks"].items():
        assert again["adapter"]["tasks"][task]["accuracy"] == scores["accuracy"]


def test_resume_after_sigkill_gives_the_same_adapter(tiny_model_dir, tmp_path):
    # dropout > 0 and random anchors: the RNG state must be restored too, not only the weights
    common = ("--max-steps", "10", "--save-steps", "3", "--eval-base", "false", "--lora-dropout", "0.1")
    straight = tmp_path / "straight"
    comoe_cli(*tiny_args(tiny_model_dir, straight, *common))

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "comoe", *tiny_args(tiny_model_dir, killed, *common)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.time() + 300
    log = killed / "train_log.jsonl"
    # killed after step 7 or 8 is logged: the steps after the step-6 checkpoint must be redone, not repeated
    while not (log.is_file() and len(log.read_text().splitlines()) >= 7):
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, "the run logged too few steps"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "killed too late: the run had finished"

    comoe_cli("train", "--resume", str(killed))
    a = load_file(straight / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["loss"] for r in read_log(straight)][-2:] == [r["loss"] for r in read_log(killed)][-2:]
    # The steps the killed process logged after its last checkpoint were redone: each step appears once,
    # and the training summary covers the whole run, not only the steps after the resume.
    assert [r["step"] for r in read_log(killed)] == list(range(1, 11))
    summary = json.loads((killed / "metrics.json").read_text())["train"]
    assert summary["resumed_at_step"] == 6 and summary["seconds"] > summary["seconds_before_resume"] > 0
    expected = json.loads((straight / "metrics.json").read_text())["train"]["final"]
    assert summary["final"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("method", ["lora", "soft-moe"])
def test_baseline_methods_end_to_end(tiny_model_dir, tmp_path, method):
    run_dir = tmp_path / method
    comoe_cli(
        *tiny_args(tiny_model_dir, run_dir, "--method", method, "--max-steps", "3", "--eval-base", "false")
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["method"] == method and metrics["trainable"] > 0
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == ("LORA" if method == "lora" else "COMOE")
    if (
        method == "lora"
    ):  # a PEFT LoRA adapter reloads for `comoe eval`; comoe's kinds: tests/test_contract.py
        comoe_cli("eval", str(run_dir))


def test_single_task_setting_trains_one_adapter_per_task(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "single"
    comoe_cli(
        *tiny_args(tiny_model_dir, run_dir, "--setting", "single", "--max-steps", "2", "--eval-base", "false")
    )
    for task in TASKS.split(","):
        assert (run_dir / "adapters" / task / "adapter" / "adapter_model.safetensors").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["adapter"]["tasks"]) == set(TASKS.split(","))


def test_malformed_jsonl_fails_before_training_naming_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "mine.jsonl"
    bad.write_text(
        '{"question": "q1", "choices": ["a", "b"], "answer": 0}\n{"question": "q2", "choices": ["a"]}\n'
    )
    result = comoe_cli(
        "train",
        "--model",
        str(tiny_model_dir),
        "--tasks",
        f"jsonl:{bad}",
        "--output-dir",
        str(tmp_path / "run"),
        check=False,
    )
    assert result.returncode != 0
    assert f"{bad}:2" in result.stderr
    assert not (tmp_path / "run" / "train_log.jsonl").exists()


LAUNCHERS = {  # the README's two DDP launch commands, up to `-m comoe`
    "torchrun": ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
    "accelerate": ["accelerate.commands.launch", "--config_file", "examples/accelerate/ddp.yaml",
                   "--main_process_port", "29518"],
}  # fmt: skip


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_ddp_two_processes_on_cpu(tiny_model_dir, tmp_path, launcher):
    """torchrun and accelerate launch, 2 processes, gloo: loss falls, both ranks end with identical adapter
    weights."""
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    config = tmp_path / "ddp.yaml"  # a YAML file: torchrun would take `--r` for one of its own flags
    config.write_text(
        f"model: {tiny_model_dir}\ntasks: [{TASKS}]\ntrain_per_task: 48\ntest_per_task: 8\n"
        f"batch_size: 4\nr: 4\nlearning_rate: 5.0e-3\nmax_steps: 12\neval_base: false\n"
    )
    cmd = [
        sys.executable,
        "-m",
        *LAUNCHERS[launcher],
        "-m",
        "comoe",
        "train",
        "--config",
        str(config),
        "--output-dir",
        str(run_dir),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unused parameters" not in result.stderr.lower()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["processes"] == 2
    assert metrics["train"]["replicas_identical"] is True
    losses = [row["task"] for row in read_log(run_dir)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3


def test_use_dora_trains_dora_experts_and_analyze_reads_them(tiny_model_dir, tmp_path):
    """`comoe train --use-dora`: CoMoE-DoRA experts with the contrastive term; the adapter saved (its reload
    to the same logits: tests/test_contract.py); `comoe analyze` materialises their outputs. (`--method lora
    --use-dora`, PEFT's DoRA, is tested in tests/test_dora.py.)"""
    run_dir = tmp_path / "dora"
    comoe_cli(
        *tiny_args(tiny_model_dir, run_dir, "--use-dora", "--max-steps", "3"),
        "--contrastive-weight",
        "0.1",
        "--no-eval-base",
    )
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any("comoe_magnitude" in name for name in tensors), sorted(tensors)[:5]
    assert all(row["contrastive"] > 0 for row in read_log(run_dir))  # the materialised loss of DoRA experts
    # the analysis materialises DoRA expert outputs (magnitude term included) for its redundancy numbers
    comoe_cli("analyze", str(run_dir), "--test-per-task", "4", "--no-tsne", "--no-progress")
    summary = json.loads((run_dir / "analysis" / "metrics.json").read_text())["runs"][0]["summary"]
    assert summary["contrastive_loss"] > 0 and -1 <= summary["cosine"] <= 1 and 0 <= summary["cka"] <= 1


def test_placement_ffn_trains_whole_ffn_experts_and_analyze_reads_their_blocks(tiny_model_dir, tmp_path):
    """`comoe train --placement ffn`: MixLoRA's layout with the contrastive term (FFN experts on each MLP
    block, plain LoRA on attention); `comoe analyze` records the blocks' routing and expert outputs."""
    run_dir = tmp_path / "ffn"
    comoe_cli(*tiny_args(tiny_model_dir, run_dir, "--placement", "ffn", "--max-steps", "3"), "--no-eval-base")
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert any(name.endswith("mlp.experts.comoe_down_B") for name in tensors), sorted(tensors)[:5]
    assert not any("self_attn" in name and "router" in name for name in tensors)  # plain LoRA there
    assert all(row["contrastive"] > 0 for row in read_log(run_dir))
    comoe_cli("analyze", str(run_dir), "--test-per-task", "4", "--no-tsne", "--no-progress")
    report = json.loads((run_dir / "analysis" / "metrics.json").read_text())["runs"][0]
    assert set(report["modules"]) == {"model.layers.0.mlp", "model.layers.1.mlp"}
    assert report["summary"]["contrastive_loss"] > 0 and 0 <= report["summary"]["cka"] <= 1


def test_method_mixlora_takes_mixloras_defaults_unless_given(tiny_model_dir, tmp_path):
    """`--method mixlora`: 8 experts, top-2, balance loss 0.01, no contrastive term, on the MLP blocks;
    a given --num-experts wins over the default."""
    run_dir = tmp_path / "mixlora"
    comoe_cli(
        *tiny_args(tiny_model_dir, run_dir, "--method", "mixlora", "--max-steps", "2"), "--no-eval-base"
    )
    run = RunConfig.from_yaml(run_dir / "run_config.yaml")
    trained = run.trained_adapter
    assert (trained.placement, trained.num_experts, trained.top_k) == ("ffn", 8, 2)
    assert (trained.balance_weight, trained.contrastive_weight) == (0.01, 0.0)
    assert all(row["balance"] > 0 and row.get("contrastive") in (None, 0) for row in read_log(run_dir))
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    router = next(v for k, v in tensors.items() if k.endswith("mlp.router.comoe_router"))
    assert router.shape[0] == 8
    given = RunConfig(method="mixlora", adapter={"num_experts": 6})
    assert (given.trained_adapter.num_experts, given.trained_adapter.top_k) == (6, 2)


def test_the_math_suite_trains_and_scores_generated_numbers(tiny_model_dir, tmp_path):
    """`--tasks suite:math`: generated arithmetic answers scored by their final number, beside a
    multiple-choice task, in one multi-task run."""
    run_dir = tmp_path / "math"
    comoe_cli(
        "train",
        *tiny_run_flags(tiny_model_dir, tasks="suite:math"),  # as the README writes it
        "--max-steps",
        "2",
        "--output-dir",
        str(run_dir),
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for kind in ("adapter", "base", "majority"):
        scores = metrics[kind]["tasks"]
        assert scores["arithmetic_2_digit_addition"]["metric"] == "numeric_match"
        assert (
            "metric" not in scores["elementary_math_qa"]
            or scores["elementary_math_qa"]["metric"] != "numeric_match"
        )
        assert all(0 <= s["accuracy"] <= 1 and s["n"] == 4 for s in scores.values()) and len(scores) == 7


def test_compile_trains_what_eager_trains(tiny_model_dir, eager_run, tmp_path, monkeypatch):
    """`--compile` (inductor, each decoder layer) with the contrastive term, routing health and validation
    on: eager's losses and adapter within float tolerance, and eager's evaluation. Steps 1 and 3 run
    compiled (steps 2 and 4 log routing health: eager)."""
    eager, compiled = eager_run, tmp_path / "compiled"
    inductor = tmp_path / "inductor"  # where inductor writes the kernels it generates: a sign it compiled
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(inductor))
    comoe_cli(*tiny_args(tiny_model_dir, compiled, *EAGER_FLAGS, "--eval-base", "false", "--compile"))
    assert any(path.suffix == ".py" for path in inductor.rglob("*")), "inductor generated no code"
    assert RunConfig.from_yaml(compiled / "run_config.yaml").compile
    for expected, got in zip(read_log(eager), read_log(compiled), strict=True):
        for key in ("loss", "task", "contrastive", "val_loss", "routing_entropy_min"):
            assert (key in got) == (key in expected), key
            if key in got:
                assert got[key] == pytest.approx(expected[key], rel=1e-5), (got["step"], key)
    a = load_file(eager / "adapter" / "adapter_model.safetensors")
    b = load_file(compiled / "adapter" / "adapter_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    scores = [json.loads((run / "metrics.json").read_text())["adapter"]["macro"] for run in (eager, compiled)]
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
