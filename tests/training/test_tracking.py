"""Watching a run: gradient clipping and its logged norm, routing health, validation, and `--report-to
tensorboard` through the real command line (event files that TensorBoard's own reader parses)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from comoe.cli.app import main as run_cli
from comoe.routing_health import RoutingHealth
from tests.cli_runs import comoe_cli, read_log
from tests.training.test_loop import recipe_for

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
USER_TASKS = f"jsonl:{EXAMPLES / 'sentiment.jsonl'},jsonl:{EXAMPLES / 'capitals.jsonl'}"


def total_norm(params) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))


@pytest.mark.parametrize("limit", [None, 1e-3])
def test_the_step_clips_to_max_grad_norm_and_logs_the_norm_before_clipping(tiny_model_dir, tmp_path, limit):
    recipe = recipe_for(tiny_model_dir, tmp_path, contrastive_weight=0.1, max_grad_norm=limit)
    seen = []
    recipe.optimizer.step = lambda *a, **k: seen.append(
        total_norm(recipe.params)
    )  # the gradient it steps with
    parts = recipe.step([[recipe.encoded[i] for i in (0, 1)]])
    assert parts["grad_norm"] > 1e-2  # the norm before clipping
    expected = parts["grad_norm"] if limit is None else limit
    assert seen == [pytest.approx(expected, rel=1e-4)]


def test_routing_health_counts_each_real_token_once_per_expert_it_uses(tiny_model_dir, tmp_path):
    """k = 2: each real token counts twice per layer; padding does not count; a recompute under activation
    checkpointing does not count again; outside ``watching`` nothing is counted."""
    recipe = recipe_for(tiny_model_dir, tmp_path, gradient_checkpointing=True)
    recipe.core.base_model.model.gradient_checkpointing_enable({"use_reentrant": False})
    health = RoutingHealth(recipe.core)
    micro = [[recipe.encoded[i] for i in (0, 2)]]
    real_tokens = sum(len(recipe.encoded[i].input_ids) for i in (0, 2))
    recipe.accumulate(micro)
    assert health.counts == {}
    first = next(iter(recipe.core.routed_modules.values())).router
    calls = []
    probe = first.register_forward_hook(lambda *_: calls.append(1))
    with health.watching():
        recipe.accumulate(micro)
    probe.remove()
    assert len(calls) == 2  # the forward and its recompute in backward: the guard below is exercised
    assert set(health.counts) == set(recipe.core.routed_modules)
    assert {int(c.sum()) for c in health.counts.values()} == {2 * real_tokens}
    read = health.read()
    layer = next(iter(recipe.core.routed_modules))
    share = health.counts[layer].double() / (2 * real_tokens)
    assert read[f"routing/{layer}/busiest_share"] == pytest.approx(float(share.max()), abs=1e-6)
    assert read[f"routing/{layer}/dead_experts"] == int((share == 0).sum())
    assert 0 <= read[f"routing/{layer}/load_entropy"] <= 1


@pytest.mark.slow
def test_report_to_tensorboard_writes_what_train_log_logs_plus_routing_health(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    comoe_cli(
        "train", "--model", str(tiny_model_dir), "--tasks", USER_TASKS, "--batch-size", "4", "--r", "4",
        "--max-steps", "4", "--eval-base", "false", "--output-dir", str(run_dir),
        "--report-to", "tensorboard", "--routing-health-steps", "2", "--max-grad-norm", "0.5",
        "--val-per-task", "2", "--eval-steps", "3", "--cpu-threads", "1",
    )  # fmt: skip
    log = read_log(run_dir)
    assert [row["threads"] for row in log] == [1, 1, 1, 1]
    assert [("val_loss" in row) for row in log] == [False, False, True, True]
    assert all(row["grad_norm"] > 0 for row in log)
    assert [("routing_entropy_min" in row) for row in log] == [False, True, False, True]
    events = EventAccumulator(str(run_dir / "tracking" / "comoe"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for key in ("loss", "task", "contrastive", "grad_norm", "lr"):
        values = [event.value for event in events.Scalars(f"train/{key}")]
        assert [event.step for event in events.Scalars(f"train/{key}")] == [1, 2, 3, 4]
        assert values == pytest.approx([row[key] for row in log], rel=1e-6)
    entropy = sorted(tag for tag in tags if tag.endswith("/load_entropy"))
    assert len(entropy) == 8  # q/k/v/o of 2 layers
    assert [event.step for event in events.Scalars(entropy[0])] == [2, 4]
    for key in ("val_loss", "val_accuracy"):
        assert [(e.step, e.value) for e in events.Scalars(f"train/{key}")] == [
            (row["step"], pytest.approx(row[key], rel=1e-6)) for row in log[2:]
        ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["adapter"]["tasks"]
    assert [v["step"] for v in metrics["train"]["validation"]] == [3, 4]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(tmp_path, capsys):
    assert run_cli(["train", "--report-to", "wandb", "--output-dir", str(tmp_path / "run")]) == 2
    assert "report_to='wandb' needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
