"""Validation while training (`--val-per-task`, `--eval-steps`): the held-out examples come out of the
training examples (never the test split), are scored on schedule, and leave the trained adapter as it
would be without them."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator

from comoe.data.batching import collate, encode_example
from comoe.data.registry import load_run_data
from comoe.training.adapters import build_adapted_model
from comoe.training.base_models import load_base_model
from comoe.training.loop import train_adapter
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import read_train_log
from comoe.training.task_loss import causal_lm_loss, label_tokens
from tests.training.test_loop import EXAMPLES

pytestmark = pytest.mark.usefixtures("single_thread")

VALIDATION = {"short": EXAMPLES[:2], "long": EXAMPLES[2:3]}


def _train(model_dir, work_dir, **fields):
    run = RunConfig(
        model=str(model_dir),
        tasks=["short", "long"],
        adapter={"lora_dropout": 0.1, "contrastive_weight": 0.1},  # dropout: the run draws random numbers
        batch_size=2,
        max_steps=4,
        **fields,
    )
    base, tokenizer = load_base_model(run.model)
    work_dir.mkdir()
    torch.manual_seed(0)
    model = build_adapted_model(base, run)
    result = train_adapter(
        model, tokenizer, EXAMPLES, ["short", "long"], run, work_dir, Accelerator(cpu=True),
        validation=VALIDATION,
    )  # fmt: skip
    return model, tokenizer, result


def test_validation_is_logged_on_schedule_and_leaves_the_trained_adapter_unchanged(tiny_model_dir, tmp_path):
    plain, _, _ = _train(tiny_model_dir, tmp_path / "plain")
    model, tokenizer, result = _train(tiny_model_dir, tmp_path / "validated", val_per_task=1, eval_steps=3)
    for (name, a), b in zip(plain.named_parameters(), model.parameters(), strict=True):
        if a.requires_grad:
            assert torch.equal(a, b), name  # validation draws no random number from the training's streams
    rows = read_train_log(tmp_path / "validated" / "train_log.jsonl")
    assert [("val_loss" in row) for row in rows] == [False, False, True, True]  # every 3 steps and the last
    assert [v["step"] for v in result.validation] == [3, 4]
    assert result.validation[-1] == {k: rows[-1][k] for k in ("step", "val_loss", "val_accuracy")}
    assert 0.0 <= result.validation[-1]["val_accuracy"] <= 1.0
    # the last validation loss is the final adapter's cross-entropy per answer token of the held-out examples
    encoded = [encode_example(ex, tokenizer, 0, 256) for ex in EXAMPLES[:3]]
    batch = collate(encoded, tokenizer.pad_token_id or 0)
    model.eval()
    with torch.no_grad():
        total, _ = causal_lm_loss(model, batch, trim=False, reduction="sum")
    assert result.validation[-1]["val_loss"] == pytest.approx(total.item() / label_tokens(batch["labels"]))


def test_held_out_examples_come_out_of_the_training_examples_by_the_seed():
    def load(seed, val, train=40):
        return load_run_data(["strategyqa", "social_iqa"], train, 10, seed, val_per_task=val)

    plain, held, again, other, pool = load(0, 0), load(0, 5), load(0, 5), load(1, 5), load(0, 0, None)
    assert plain.val == {}
    for task in ("strategyqa", "social_iqa"):
        assert len(held.val[task]) == 5 and len(held.train[task]) == 40  # the training count is kept
        assert all(ex in pool.train[task] for ex in held.val[task])  # from the training split
        assert not any(ex in held.train[task] for ex in held.val[task])
        assert held.val[task] == again.val[task] and held.val[task] != other.val[task]
        assert held.test[task] == plain.test[task]


def test_holding_out_every_training_example_is_refused_naming_the_task():
    with pytest.raises(ValueError, match=r"task 'strategyqa'.*val_per_task=100000 holds out all \d+"):
        load_run_data(["strategyqa"], 10, 5, 0, val_per_task=100000)


def test_eval_steps_without_held_out_examples_is_refused():
    with pytest.raises(ValueError, match=r"eval_steps=5 needs held-out examples.*--val-per-task 20"):
        RunConfig(eval_steps=5)
    with pytest.raises(ValueError, match="val_per_task must be >= 0"):
        RunConfig(val_per_task=-1)


def test_a_resume_may_change_eval_steps_and_cpu_threads_but_not_the_held_out_examples(tmp_path):
    from comoe.training.run_dir import RUN_CONFIG_NAME, resumed_run

    RunConfig(tasks=["strategyqa"], val_per_task=4, eval_steps=5).to_yaml(tmp_path / RUN_CONFIG_NAME)
    run = resumed_run(tmp_path, {"eval_steps": 2, "cpu_threads": 1}, report=False)
    assert (run.eval_steps, run.cpu_threads, run.val_per_task) == (2, 1, 4)
    with pytest.raises(ValueError, match="val_per_task"):
        resumed_run(tmp_path, {"val_per_task": 8}, report=False)
