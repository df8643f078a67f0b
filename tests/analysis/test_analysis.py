"""`comoe analyze`: metrics on planted routing, and one end-to-end run on a tiny Llama run directory."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from sklearn.metrics import mutual_info_score

from comoe import RoutingRecorder, get_comoe_model
from comoe.analysis import NotAnalysable
from comoe.analysis.metrics import (
    entropy,
    infonce_bound,
    linear_cka,
    mean_pairwise_cka,
    mean_pairwise_cosine,
    module_metrics,
    mutual_information,
    normalized_mutual_information,
)
from comoe.analysis.run_metrics import projection_data
from comoe.cli.analyze import add_analyze_arguments, analyze_flags, run_analyze
from comoe.config import CoMoEConfig
from comoe.routers import Routing
from comoe.trace import LayerTrace
from comoe.training.job import run_job
from comoe.training.run_config import RunConfig
from tests.tiny_models import batch, build, save_tiny_llama_with_real_tokenizer

NAME = "model.layers.3.self_attn.q_proj"


def planted_trace(probs: torch.Tensor, top_idx: torch.Tensor | None) -> LayerTrace:
    """A trace of module NAME that routed with these probabilities and chose ``top_idx`` (None: soft)."""
    return LayerTrace(NAME, None, Routing(probs, probs, top_idx), None, None, False, False)


def planted(tasks: torch.Tensor, top_idx: torch.Tensor, num_tasks: int, num_experts: int = 4) -> dict:
    """Feed planted routing decisions through a RoutingRecorder; return the module's metrics."""
    recorder = RoutingRecorder(num_tasks=num_tasks, contrastive=False)
    probs = torch.full((len(tasks), num_experts), 1.0 / num_experts)
    recorder.observe(planted_trace(probs, top_idx), None, tasks, None)
    return module_metrics(NAME, recorder.summary()[NAME], None, positives=1, negatives=2)


def test_experts_forced_per_task_give_nmi_one():
    tasks = torch.arange(2).repeat(500)  # task 0 always picks experts {0, 1}, task 1 always {2, 3}
    top_idx = torch.tensor([[0, 1], [3, 2]])[tasks]
    metrics = planted(tasks, top_idx, num_tasks=2)
    assert metrics["nmi"] == pytest.approx(1.0)
    assert metrics["nmi_sets"] == pytest.approx(1.0)
    assert metrics["layer"] == 3 and metrics["type"] == "q_proj"
    assert metrics["activation"] == [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]
    assert metrics["cv"] == pytest.approx(0.0)  # balanced over the two tasks


@pytest.mark.parametrize("num_tasks, expert_of_task", [(4, [0, 1, 2, 3]), (6, [0, 0, 1, 1, 2, 2])])
def test_top1_expert_determined_by_task_gives_nmi_one(num_tasks, expert_of_task):
    """k = 1; with more tasks than experts the task still determines the expert: min-normalised NMI is 1."""
    tasks = torch.arange(num_tasks).repeat(100)
    metrics = planted(tasks, torch.tensor(expert_of_task)[tasks, None], num_tasks=num_tasks)
    assert metrics["nmi"] == pytest.approx(1.0)


def test_soft_routing_counts_gate_mass():
    recorder = RoutingRecorder(num_tasks=2, contrastive=False)
    tasks = torch.arange(2).repeat(50)
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])[tasks]  # each task its own two experts
    recorder.observe(planted_trace(probs, None), None, tasks, None)
    metrics = module_metrics(NAME, recorder.summary()[NAME], None, positives=3, negatives=0)
    assert metrics["nmi"] == pytest.approx(1.0) and metrics["nmi_sets"] is None


def test_one_expert_set_per_task_gives_set_nmi_one_even_when_experts_are_shared():
    pairs = list(itertools.combinations(range(4), 2))  # 6 tasks, each its own pair of 4 experts
    tasks = torch.arange(6).repeat(200)
    metrics = planted(tasks, torch.tensor(pairs)[tasks], num_tasks=6)
    assert metrics["nmi_sets"] == pytest.approx(1.0)
    assert 0.3 < metrics["nmi"] < 0.7  # an expert is shared by three tasks: per-expert NMI cannot be 1


def test_uniform_random_routing_gives_nmi_near_zero():
    gen = torch.Generator().manual_seed(0)
    n = 20_000
    tasks = torch.randint(0, 6, (n,), generator=gen)
    top_idx = torch.rand(n, 4, generator=gen).topk(2, dim=1).indices  # a uniform random pair per token
    metrics = planted(tasks, top_idx, num_tasks=6)
    assert metrics["nmi"] < 0.005
    assert metrics["nmi_sets"] < 0.005
    assert metrics["cv"] < 0.05


def test_nmi_edge_cases():
    assert normalized_mutual_information(np.array([[5.0, 3.0]])) is None  # one task: nothing to explain
    assert normalized_mutual_information(np.array([[4.0, 0.0], [0.0, 4.0]])) == pytest.approx(1.0)
    assert normalized_mutual_information(np.array([[2.0, 2.0], [2.0, 2.0]])) == pytest.approx(0.0)


def test_identical_experts_give_redundancy_one_and_orthogonal_ones_zero():
    x = torch.randn(64, 1, 24)
    same = x.expand(64, 4, 24)
    assert mean_pairwise_cosine(same) == pytest.approx(1.0)
    assert mean_pairwise_cka(same) == pytest.approx(1.0)
    basis = torch.eye(4)[None].expand(64, 4, 4) * torch.rand(64, 1, 1)
    assert mean_pairwise_cosine(basis) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.zeros(8, 4, 5)) is None  # B = 0 at init: undefined, not 0


def test_linear_cka_is_invariant_to_rotation_and_scale():
    x = torch.randn(50, 8, dtype=torch.float64)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ rotation) == pytest.approx(1.0)
    assert linear_cka(x, torch.randn(50, 8, dtype=torch.float64)) < 0.6


def test_identical_experts_in_a_real_layer_give_redundancy_one():
    """Every expert of a CoMoE layer given the same A and B: sampled outputs through the recorder agree."""
    model = get_comoe_model(build("llama"), CoMoEConfig(r=4, num_experts=4, top_k=2, lora_dropout=0.0)).eval()
    layer = model.adapted_modules["model.layers.0.self_attn.q_proj"]
    with torch.no_grad():
        layer.experts.comoe_A.copy_(layer.experts.comoe_A[:4].repeat(4, 1))
        layer.experts.comoe_B.copy_(torch.randn(layer.out_features, 4).repeat(1, 4))
    with (
        torch.no_grad(),
        model.recording(RoutingRecorder(sample_outputs=10, sample_modules={layer.module_name})) as rec,
    ):
        model(**batch("llama"))
    outputs = rec.records[layer.module_name].outputs()[0]
    metrics = module_metrics(
        layer.module_name, rec.summary()[layer.module_name], outputs, positives=1, negatives=2
    )
    assert metrics["cosine"] == pytest.approx(1.0) and metrics["cka"] == pytest.approx(1.0)
    assert metrics["sampled_tokens"] == 10


def test_infonce_bound_is_zero_at_chance():
    assert infonce_bound(math.log(3), positives=1, negatives=2) == pytest.approx(0.0)
    assert infonce_bound(0.0, positives=1, negatives=2) == pytest.approx(math.log(3))  # the maximum, log N
    assert infonce_bound(math.log(2), positives=2, negatives=2) == pytest.approx(0.0)  # k = 3: N = 4/2
    assert infonce_bound(None, 1, 2) is None


def test_recorder_spreads_samples_over_the_pass():
    model = get_comoe_model(build("llama"), CoMoEConfig(r=4, num_experts=4, top_k=2)).eval()
    name = "model.layers.1.self_attn.v_proj"
    rec = RoutingRecorder(sample_outputs=6, sample_modules=set(), sample_limits={name: 6}, spread_over=3)
    with torch.no_grad(), model.recording(rec):
        for seed in range(3):
            model(**batch("llama", seed=seed))
    assert [t.shape[0] for t in rec.records[name].sampled_outputs] == [2, 2, 2]
    assert rec.records["model.layers.1.self_attn.q_proj"].sampled == 0


# --- end to end ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory written by `comoe train`'s job for a 2-layer random Llama with SmolLM2's tokenizer."""
    root = tmp_path_factory.mktemp("analyze")
    model_dir = root / "tiny-llama"
    save_tiny_llama_with_real_tokenizer(model_dir)
    run = RunConfig(
        model=str(model_dir),
        tasks=["strategyqa", "social_iqa"],
        train_per_task=8,
        test_per_task=4,
        batch_size=4,
        adapter={"r": 4, "contrastive_weight": 0.1},
        learning_rate=5e-2,
        max_steps=3,
        eval_base=False,
    )
    run_job(run, root / "run")  # what `comoe train` runs, in-process: no interpreter start-up
    return root / "run"


def analyze_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(parents=analyze_flags())
    add_analyze_arguments(parser)
    return run_analyze(parser.parse_args(list(argv)))


@pytest.mark.slow
def test_analyze_end_to_end_compares_runs_and_skips_lora(tiny_run, tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "run_config.yaml").write_text(
        (tiny_run / "run_config.yaml").read_text().replace("method: comoe", "method: lora")
    )
    twin = tmp_path / "twin"
    shutil.copytree(tiny_run, twin)
    out = tmp_path / "out"
    assert (
        analyze_cli(
            str(tiny_run),
            str(twin),
            str(lora),
            "--out",
            str(out),
            "--test-per-task",
            "6",
            "--samples",
            "16",
            "--projection-samples",
            "24",
            "--no-progress",
        )
        == 0
    )
    payload = json.loads((out / "metrics.json").read_text())
    assert [s["run_dir"] for s in payload["skipped"]] == [str(lora)]
    assert "nothing to analyse" in payload["skipped"][0]["reason"]
    runs = payload["runs"]
    assert len(runs) == 2 and runs[0]["label"] != runs[1]["label"]  # equal labels get the directory name
    run = runs[0]
    assert run["tasks"] == ["strategyqa", "social_iqa"] and run["examples_per_task"] == {
        "strategyqa": 6,
        "social_iqa": 6,
    }
    assert [row["layer"] for row in run["layers"]] == [0, 1]
    assert len(run["modules"]) == 8
    for row in run["layers"]:
        assert 0.0 <= row["nmi"] <= 1.0 and row["contrastive_loss"] is not None and row["cosine"] is not None
    assert np.asarray(run["load"]["all"]).shape == (2, 4)
    assert np.allclose(np.asarray(run["load"]["all"]).sum(1), 2.0)  # top-2: every token activates two experts
    assert run["projection"]["module"] == "model.layers.1.self_attn.q_proj"  # the middle of layers 0..1
    report = (out / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"load_overview.png", "nmi.png", "balance.png", "redundancy.png", "contrastive.png"} <= set(images)
    assert any(name.startswith("projection_pca") for name in images)
    for name in images:
        assert (out / name).stat().st_size > 5_000, name
    assert str(lora) in report and "| run | accuracy | NMI" in report


@pytest.mark.slow
def test_analyze_refuses_runs_without_routers_and_bad_modules(tiny_run, tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "run_config.yaml").write_text("method: lora\n")
    with pytest.raises(NotAnalysable, match="nothing to analyse"):
        analyze_cli(str(lora), "--out", str(tmp_path / "out"))
    with pytest.raises(ValueError, match="adapted layers: \\[0, 1\\]"):
        analyze_cli(
            str(tiny_run),
            "--out",
            str(tmp_path / "out2"),
            "--layer",
            "7",
            "--test-per-task",
            "2",
            "--no-progress",
        )


def test_projection_runs_scikit_learns_tsne():
    outputs = torch.randn(10, 4, 6, generator=torch.Generator().manual_seed(0))
    chosen = torch.tensor([[0, 1]] * 10)
    data = projection_data(outputs, chosen, use_tsne=True, seed=0)
    assert data["pca"].shape == (40, 2) and data["tsne"].shape == (40, 2) and np.isfinite(data["tsne"]).all()
    np.testing.assert_array_equal(
        projection_data(outputs, chosen, use_tsne=True, seed=0)["tsne"], data["tsne"]
    )
    assert data["active"].reshape(10, 4)[:, :2].all() and not data["active"].reshape(10, 4)[:, 2:].any()
    assert sum(data["explained_variance"]) <= 1.0
    assert projection_data(outputs, chosen, use_tsne=False, seed=0)["tsne"] is None


def test_entropy_and_mutual_information_match_scipy_and_scikit_learn():
    """Our plug-in estimates are the textbook ones: cross-checked on random task × expert count tables."""
    rng = np.random.default_rng(0)
    for shape in [(6, 4), (2, 8), (3, 3)]:
        joint = rng.integers(0, 60, shape)
        assert entropy(joint.sum(1)) == pytest.approx(scipy.stats.entropy(joint.sum(1)), abs=1e-12)
        assert entropy(joint.sum(0)) == pytest.approx(scipy.stats.entropy(joint.sum(0)), abs=1e-12)
        assert mutual_information(joint) == pytest.approx(
            mutual_info_score(None, None, contingency=joint), abs=1e-12
        )
