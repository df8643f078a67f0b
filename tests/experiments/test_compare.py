"""`comoe compare`: a resumable grid on a tiny model, and the paired bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest

from comoe.experiments.grid import PRESETS, REFERENCE, Grid
from comoe.experiments.stats import paired_bootstrap
from comoe.experiments.summary import MAJORITY, SPECIALISATION, modal_share, references, summarise_grid
from tests.cli_runs import TASKS, comoe_cli, tiny_run_flags


def test_paired_bootstrap_detects_a_real_difference_and_not_a_null_one():
    rng = np.random.default_rng(0)
    same = [{"t": rng.random(300) < 0.6} for _ in range(3)]
    point, low, high = paired_bootstrap(same, same)
    assert point == 0.0 and low == 0.0 and high == 0.0
    better = [{"t": np.ones(300, dtype=bool)} for _ in range(3)]
    worse = [{"t": rng.random(300) < 0.5} for _ in range(3)]
    point, low, high = paired_bootstrap(better, worse)
    assert 0.4 < point < 0.6 and low > 0.3
    noisy_a = [{"t": rng.random(300) < 0.5} for _ in range(3)]
    noisy_b = [{"t": rng.random(300) < 0.5} for _ in range(3)]
    point, low, high = paired_bootstrap(noisy_a, noisy_b)
    assert low < point < high and low < 0.0 < high


def test_paired_bootstrap_matches_a_plain_resampling_loop():
    """The vectorised bootstrap draws the same distribution as resampling seeds and examples one by one."""
    rng = np.random.default_rng(1)
    a = [{"t": rng.random(200) < p, "u": rng.random(80) < p + 0.1} for p in (0.5, 0.6, 0.7, 0.55)]
    b = [{"t": rng.random(200) < 0.5, "u": rng.random(80) < 0.5} for _ in range(4)]
    loop_rng = np.random.default_rng(0)
    diff = [
        np.stack([x[t].astype(float) - y[t].astype(float) for x, y in zip(a, b, strict=True)])
        for t in ("t", "u")
    ]
    stats = []
    for _ in range(4000):
        seeds = loop_rng.integers(0, 4, 4)
        stats.append(
            np.mean([d[seeds][:, loop_rng.integers(0, d.shape[1], d.shape[1])].mean() for d in diff])
        )
    point, low, high = paired_bootstrap(a, b, samples=4000)
    assert point == pytest.approx(np.mean([d.mean() for d in diff]))
    assert (low, high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])), abs=0.01)


def test_presets_build_valid_run_configs():
    for name, variants in PRESETS.items():
        cells = Grid(variants=variants, seeds=[0], base={"train_per_task": 4}).runs()
        assert len(cells) == len(variants), name
        assert set(references(REFERENCE.get(name))) <= set(variants), name


def fake_run(variant: str, seed: int, correct: dict[str, list[bool]]) -> dict:
    """The parts of a finished run's metrics that `summarise_grid` reads."""
    tasks = {
        t: {
            "accuracy": float(np.mean(c)),
            "predictions": [0 if ok else 2 for ok in c],
            "answers": [0] * len(c),
        }
        for t, c in correct.items()
    }
    macro = float(np.mean([v["accuracy"] for v in tasks.values()]))
    return {
        "variant": variant,
        "setting": "multi",
        "seed": seed,
        "trainable": 10,
        "total_params": 100,
        "train_seconds": 60.0,
        "train": {"seconds": 30.0},
        "majority": {"tasks": {t: {"majority": 1} for t in correct}, "macro": {"accuracy": 0.0}},
        "adapter": {"tasks": tasks, "macro": {"accuracy": macro}},
        "specialisation": None,
    }


def test_summarise_takes_each_pair_once_against_every_reference():
    rng = np.random.default_rng(1)
    finished = [
        fake_run(v, s, {"a": list(rng.random(50) < p), "b": list(rng.random(50) < p)})
        for v, p in (("lora", 0.4), ("moe-lora", 0.5), ("comoe", 0.9))
        for s in (0, 1, 2)
    ]
    summary = summarise_grid(finished, ["moe-lora", "lora"])
    pairs = [(d["variant"], d["reference"]) for d in summary["differences"]]
    assert pairs == [
        ("lora", "moe-lora"),
        ("comoe", "moe-lora"),
        ("comoe", "lora"),
        ("lora", MAJORITY),
        ("moe-lora", MAJORITY),
        ("comoe", MAJORITY),
    ]
    # the majority class (answer 1) is never right here, so each variant beats it by its own accuracy
    for d in summary["differences"][3:]:
        (row,) = [r for r in summary["rows"] if r["variant"] == d["variant"]]
        assert d["mean"] == pytest.approx(row["average"][0]) and d["significant"]
    comoe_vs_lora = summary["differences"][2]
    assert (
        comoe_vs_lora["significant"]
        and comoe_vs_lora["ci95"][0] > 0.3
        and len(comoe_vs_lora["per_seed"]) == 3
    )
    (comoe_row,) = [r for r in summary["rows"] if r["variant"] == "comoe"]
    assert comoe_row["train_minutes"] == (0.5, 0.0) and comoe_row["run_minutes"] == (1.0, 0.0)
    assert comoe_row["majority_average"] == (0.0, 0.0) and comoe_row["specialisation"] == {}
    assert 0.5 <= comoe_row["modal_share"][0] <= 1.0
    assert summarise_grid(finished, "comoe")["differences"][0]["reference"] == "comoe"
    assert [d["reference"] for d in summarise_grid(finished, None)["differences"]] == [MAJORITY] * 3


def test_summarise_pairs_each_variants_single_task_setting_with_its_multi_task_one():
    rng = np.random.default_rng(2)
    finished = []
    for setting, p in (("multi", 0.5), ("single", 0.9)):
        for seed in (0, 1):
            run = fake_run("comoe", seed, {"a": list(rng.random(80) < p), "b": list(rng.random(80) < p)})
            finished.append({**run, "setting": setting})
    finished.append(fake_run("lora", 0, {"a": [True] * 80, "b": [True] * 80}))  # multi only: no pair
    pairs = [
        (d["variant"], d["reference"], d["setting"]) for d in summarise_grid(finished, None)["differences"]
    ]
    assert pairs[0] == ("comoe", "comoe (multi)", "single") and [p[1] for p in pairs[1:]] == [MAJORITY] * 3
    single_vs_multi = summarise_grid(finished, None)["differences"][0]
    assert (
        single_vs_multi["significant"]
        and single_vs_multi["ci95"][0] > 0.2
        and single_vs_multi["seeds"] == [0, 1]
    )


def test_modal_share_is_one_for_a_constant_answer_and_falls_with_spread():
    assert modal_share(fake_run("x", 0, {"a": [True] * 8, "b": [False] * 4})) == 1.0
    assert modal_share(fake_run("x", 0, {"a": [True, False] * 4})) == 0.5


@pytest.mark.slow
def test_grid_runs_summarises_and_skips_finished_runs(tiny_model_dir, tmp_path):  # noqa: F811
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "variants:\n  moe-lora: {method: moe-lora}\n  comoe: {method: comoe, adapter: {contrastive_weight: 0.1}}\n"
        "seeds: [0, 1]\nreference: moe-lora\n"
        f"base: {{model: '{tiny_model_dir}', tasks: [{TASKS}], train_per_task: 16, test_per_task: 8, "
        "batch_size: 4, r: 4, max_steps: 2, eval_base: false}\n"
    )
    out = tmp_path / "grid"
    first = comoe_cli("compare", "--grid", str(grid), "--out", str(out), "--jobs", "2")  # two cells at a time
    assert first.stdout.count("running in") == 4
    summary = json.loads((out / "summary.json").read_text())
    assert {r["variant"] for r in summary["rows"]} == {"moe-lora", "comoe"}
    diff, *against_majority = summary["differences"]
    assert diff["variant"] == "comoe" and diff["reference"] == "moe-lora" and len(diff["per_seed"]) == 2
    assert [d["reference"] for d in against_majority] == [MAJORITY] * 2
    assert diff["ci95"][0] <= diff["mean"] <= diff["ci95"][1]
    markdown = (out / "summary.md").read_text()
    assert "| comoe − moe-lora |" in markdown
    # the specialisation numbers come from a `comoe analyze` pass, kept per run
    for row in summary["rows"]:
        nmi, std = row["specialisation"]["nmi"]
        assert 0.0 <= nmi <= 1.0 and std >= 0.0
        assert set(row["specialisation"]) == set(SPECIALISATION)
    assert len(list(out.glob("runs/*/analysis.json"))) == 4
    assert "| variant | setting | NMI |" in markdown
    assert f"Command: `comoe compare --grid {grid} --out {out} --jobs 2`" in markdown
    # a rerun skips finished runs and their analyses; --summary-only keeps the command that ran the grid
    analysis_times = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/analysis.json")}
    again = comoe_cli("compare", "--grid", str(grid), "--out", str(out))
    assert again.stdout.count("done, skipped") == 4 and "running in" not in again.stdout
    comoe_cli("compare", "--grid", str(grid), "--out", str(out), "--summary-only")
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/analysis.json")} == analysis_times
    # the rerun (without --jobs) is the command that last ran the grid
    assert f"Command: `comoe compare --grid {grid} --out {out}`" in (out / "summary.md").read_text()
    assert json.loads((out / "summary.json").read_text())["rows"] == summary["rows"]


@pytest.mark.slow
def test_single_task_setting_trains_one_adapter_per_task_and_skips_analysis(tiny_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "grid"
    comoe_cli(
        "compare",
        "--preset",
        "negatives",
        "--seeds",
        "0",
        "--settings",
        "multi,single",
        "--jobs",
        "2",
        "--out",
        str(out),
        # every run's fields as `comoe train` takes them (the adapter's too), and `--set` as before
        *tiny_run_flags(tiny_model_dir),
        "--set",
        "max_steps=1",
        "--no-eval-base",
    )
    summary = json.loads((out / "summary.json").read_text())
    rows = [(r["variant"], r["setting"]) for r in summary["rows"]]
    assert sorted(rows) == sorted(
        (v, s) for v in ("negatives=all", "negatives=1") for s in ("multi", "single")
    )
    for row in summary["rows"]:
        assert set(row["tasks"]) == set(TASKS.split(","))
        assert (row["specialisation"] == {}) == (row["setting"] == "single")
        assert 0 < row["train_minutes"][0] <= row["run_minutes"][0]
    pairs = {(d["variant"], d["reference"], d["setting"]) for d in summary["differences"]}
    assert {
        ("negatives=1", "negatives=all", "single"),
        ("negatives=1", "negatives=all", "multi"),
        ("negatives=all", "negatives=all (multi)", "single"),
        ("negatives=1", "negatives=1 (multi)", "single"),
    } <= pairs
    # single-task runs have no task-expert relation to analyse
    assert {p.parent.name for p in out.glob("runs/*/analysis.json")} == {
        "negatives=all-multi-seed0",
        "negatives=1-multi-seed0",
    }


@pytest.mark.slow
def test_jobs_trains_cells_side_by_side_and_names_a_failed_cell(tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    """`--jobs 2`: two cells at once, each with its output in its own train.log; a cell that fails is named
    and the other finishes (a cell is done once its metrics.json is written: a rerun skips finished cells,
    test_grid_runs_summarises_and_skips_finished_runs)."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "variants:\n  lora: {method: lora}\n  broken: {method: lora, model: 'no-such-model-dir'}\n"
        "seeds: [0]\n"
        f"base: {{model: '{tiny_model_dir}', tasks: [{TASKS}], train_per_task: 8, test_per_task: 4, "
        "batch_size: 4, r: 4, max_steps: 1, eval_base: false}\n"
    )
    out = tmp_path / "grid"
    # offline, as on this machine: the missing model directory (a hub id) fails at once, without retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # as the README has it: `comoe compare --jobs 2 --set test_per_task=none` (every test example)
    failed = comoe_cli(
        "compare",
        "--grid",
        str(grid),
        "--out",
        str(out),
        "--jobs",
        "2",
        "--set",
        "test_per_task=none",
        "--no-analysis",
        check=False,
    )
    assert failed.returncode == 2 and "1 run(s) failed: [2/2] broken multi seed 0" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert (out / "runs/lora-multi-seed0/metrics.json").is_file()
    assert "no-such-model-dir" in (out / "runs/broken-multi-seed0/train.log").read_text()
    assert "adapter" in (out / "runs/lora-multi-seed0/train.log").read_text()  # its table went to the log
    scores = json.loads((out / "runs/lora-multi-seed0/metrics.json").read_text())["adapter"]["tasks"]
    assert {task: s["n"] for task, s in scores.items()} == {"strategyqa": 300, "social_iqa": 300}


@pytest.mark.slow
def test_jobs_must_be_positive(tmp_path):
    result = comoe_cli(
        "compare", "--preset", "default", "--out", str(tmp_path / "g"), "--jobs", "0", check=False
    )
    assert result.returncode == 2 and "jobs must be >= 1, got 0" in result.stderr
    assert not (tmp_path / "g").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("preset", "variants", "settings", "tasks"),
    [
        ("table1", {"lora", "dora", "moe-lora", "mixlora", "comoe", "comoe-dora"}, ["multi", "single"], None),
        ("table2", {"lora", "dora", "comoe-lora", "comoe-dora"}, ["single"], None),
        ("table3", {"lora", "moe-lora", "comoe"}, ["multi"], ["suite:math"]),
    ],
)
def test_table_presets_have_the_papers_structure_and_valid_cells(tmp_path, preset, variants, settings, tasks):
    from comoe.experiments.grid import load_grid, preset_grid

    path = tmp_path / "grid.yaml"
    path.write_text(f"preset: {preset}\nseeds: [0]\nbase: {{max_steps: 5}}\n")
    for grid in (preset_grid(preset), load_grid(path)):
        assert set(grid.variants) == variants and grid.settings == settings
        cells = grid.runs()  # every cell is a valid run
        assert {config.adapter.use_dora for *_, config in cells} == {"dora" in name for name in variants}
        for *_, config in cells:  # MixLoRA's whole-FFN experts with its published defaults
            if config.method == "mixlora":
                trained = config.trained_adapter
                assert (trained.placement, trained.num_experts, trained.balance_weight) == ("ffn", 8, 0.01)
        if tasks:
            assert all(config.tasks == tasks for *_, config in cells)
    assert load_grid(path).base["max_steps"] == 5
