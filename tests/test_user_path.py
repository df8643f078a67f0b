"""The paths a new user takes first, through the real command line, with the flags as the README writes them.

On a tiny Llama with SmolLM2's tokenizer: the README's own JSONL example files (multiple choice without
`split` fields, generation with them, two files at once) through train → eval → analyze; `--bf16 true`
with the contrastive term in the log and in the optimised loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comoe.data.registry import load_splits
from comoe.training.run_config import RunConfig
from tests.cli_runs import comoe_cli, read_log

pytestmark = pytest.mark.slow  # every test here runs `comoe` end to end

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
USER_TASKS = f"jsonl:{EXAMPLES / 'sentiment.jsonl'},jsonl:{EXAMPLES / 'capitals.jsonl'}"


def small(model_dir: Path, out: Path, tasks: str, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--tasks",
        tasks,
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


def test_readme_example_files_have_no_input_in_both_splits():
    train, test = load_splits(USER_TASKS.split(","), train_per_task=None, test_per_task=None, seed=0)
    assert list(train) == list(test) == ["sentiment", "capitals"]
    assert (len(train["sentiment"]), len(test["sentiment"])) == (32, 8)  # no split field: a fifth held out
    assert (len(train["capitals"]), len(test["capitals"])) == (24, 6)  # the file's split fields
    for task in train:
        assert not {e.question for e in train[task]} & {e.question for e in test[task]}


def test_two_user_files_train_eval_analyze(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "mine"
    result = comoe_cli(*small(tiny_model_dir, run_dir, USER_TASKS, "--max-steps", "3"))
    assert (
        "sentiment (32 train / 8 test)" in result.stdout and "capitals (24 train / 6 test)" in result.stdout
    )
    table = result.stdout[result.stdout.index("majority class") :]
    assert "sentiment" in table and "capitals" in table  # each row names its task, not its path
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["adapter"]["tasks"]) == ["sentiment", "capitals"]
    assert metrics["adapter"]["tasks"]["capitals"]["n"] == 6
    assert all("contrastive" in row for row in read_log(run_dir))

    comoe_cli("eval", str(run_dir))
    again = json.loads((run_dir / "eval_label.json").read_text())
    for task, scores in metrics["adapter"]["tasks"].items():
        assert again["adapter"]["tasks"][task]["accuracy"] == scores["accuracy"]

    comoe_cli("eval", str(run_dir), "--protocol", "loglik")
    loglik = json.loads((run_dir / "eval_loglik.json").read_text())
    assert set(loglik["adapter"]["tasks"]) == {"sentiment", "capitals"}

    comoe_cli("analyze", str(run_dir), "--out", str(tmp_path / "analysis"), "--no-tsne", "--no-progress")
    analysed = json.loads((tmp_path / "analysis" / "metrics.json").read_text())
    assert analysed["runs"][0]["tasks"] == ["sentiment", "capitals"]


@pytest.mark.parametrize("flag", ["--bf16", "--bf16 true --gradient-checkpointing true"])
def test_bf16_keeps_the_contrastive_term_in_the_optimised_loss(tiny_model_dir, tmp_path, flag):
    run_dir = tmp_path / "bf16"
    comoe_cli(
        *small(
            tiny_model_dir,
            run_dir,
            "strategyqa",
            "--train-per-task",
            "16",
            "--test-per-task",
            "4",
            "--max-steps",
            "3",
            "--eval-base",
            "false",
            "--contrastive-weight",
            "0.5",
            *flag.split(),
        )
    )
    log = read_log(run_dir)
    assert len(log) == 3
    for row in log:
        assert row["contrastive"] > 0, "bf16 dropped the contrastive term"
        assert row["loss"] == pytest.approx(row["task"] + 0.5 * row["contrastive"], rel=1e-4, abs=1e-4)
    assert RunConfig.from_yaml(run_dir / "run_config.yaml").bf16 is True


def test_readme_config_file_with_flags_and_the_moe_lora_ablation(tiny_model_dir, tmp_path):
    """`comoe train --config my.yaml --learning-rate 1e-3 --tasks intent_recognition,bbq_ambiguous`, as the README
    has it."""
    config = tmp_path / "my.yaml"
    config.write_text(
        f"model: {tiny_model_dir}\nmethod: moe-lora\nlearning_rate: 5e-2\nr: 4\nbatch_size: 4\n"
        f"train_per_task: 8\ntest_per_task: 4\nmax_steps: 2\neval_base: false\n"
        f"output_dir: {tmp_path / 'run'}\n"
    )
    comoe_cli(
        "train",
        "--config",
        str(config),
        "--learning-rate",
        "1e-3",
        "--tasks",
        "intent_recognition,bbq_ambiguous",
    )
    run = RunConfig.from_yaml(tmp_path / "run" / "run_config.yaml")
    assert (run.learning_rate, run.tasks, run.method, run.adapter.r) == (
        1e-3,
        ["intent_recognition", "bbq_ambiguous"],
        "moe-lora",
        4,
    )
    assert all("contrastive" not in row for row in read_log(tmp_path / "run"))  # λ = 0: no contrastive term


def test_readme_tasks_and_base_only_eval(tiny_model_dir):
    listed = comoe_cli("tasks").stdout.split()
    assert {
        "suite:learnable",
        "suite:hard",
        "suite:math",
        "unit_identification",
        "winowhy",
        "arc_e",
        "gsm8k",
    } <= set(listed)
    result = comoe_cli(
        "eval",
        "--base-only",
        "--tasks",
        "unit_identification",
        "--model",
        str(tiny_model_dir),
        "--test-per-task",
        "4",
    )
    assert "unit_identification" in result.stdout


def test_a_loss_that_turns_nan_stops_the_run_without_saving_an_adapter(tiny_model_dir, tmp_path, capsys):
    """A base model with a NaN weight (a broken checkpoint) makes every loss NaN: the run must say so."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from comoe.cli import main

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    name = next(k for k in weights if k.endswith("input_layernorm.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    status = main(
        small(
            broken,
            run_dir,
            "strategyqa",
            "--train-per-task",
            "8",
            "--test-per-task",
            "4",
            "--max-steps",
            "3",
            "--eval-base",
            "false",
        )
    )
    message = capsys.readouterr().err
    assert status == 2, message
    assert "the loss is nan at step 1" in message and "no adapter was saved" in message, message
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()


def test_resume_with_another_protocol_and_test_size_rescores_the_base_model(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    args = small(
        tiny_model_dir,
        run_dir,
        "strategyqa",
        "--train-per-task",
        "8",
        "--test-per-task",
        "4",
        "--max-steps",
        "2",
    )
    comoe_cli(*args)
    comoe_cli("train", "--resume", str(run_dir), "--protocol", "loglik", "--test-per-task", "3")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["protocol"] == "loglik"
    for column in ("base", "adapter"):  # both columns scored on the same 3 examples with the same protocol
        assert metrics[column]["tasks"]["strategyqa"]["n"] == 3
        assert "acc_norm" in metrics[column]["tasks"]["strategyqa"]  # a loglik-only score


def test_too_few_examples_for_one_step_fail_before_anything_is_written(tiny_model_dir, tmp_path, capsys):
    from comoe.cli import main

    run_dir = tmp_path / "run"
    status = main(small(tiny_model_dir, run_dir, "strategyqa", "--train-per-task", "2", "--grad-accum", "4"))
    message = capsys.readouterr().err
    assert status == 2 and "2 training examples make no full step" in message and "grad_accum=4" in message
    assert not run_dir.exists()


def test_a_whole_suite_by_name(tiny_model_dir, tmp_path):
    """`comoe train --tasks suite:hard`, as the README has it."""
    run_dir = tmp_path / "suite"
    comoe_cli(
        *small(
            tiny_model_dir,
            run_dir,
            "suite:hard",
            "--train-per-task",
            "4",
            "--test-per-task",
            "2",
            "--max-steps",
            "1",
            "--eval-base",
            "false",
        )
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics["adapter"]["tasks"]) == [
        "social_iqa",
        "strategyqa",
        "winowhy",
        "epistemic_reasoning",
        "logical_fallacy_detection",
        "elementary_math_qa",
    ]
    assert all(scores["n"] == 2 for scores in metrics["adapter"]["tasks"].values())
