"""The training recipe's loss normalisation: gradient accumulation and micro-batch sizes do not change
what an optimiser step optimises."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from comoe.data.schema import Example
from comoe.training.adapters import build_adapted_model
from comoe.training.base_models import load_base_model
from comoe.training.loop import TrainingRecipe
from comoe.training.run_config import RunConfig
from comoe.training.run_dir import read_train_log, truncate_train_log
from comoe.training.steps import make_scheduler

pytestmark = pytest.mark.usefixtures("single_thread")

# Prompts of very different lengths: trained on the prompt too, the two micro-batches below hold 3× more
# label tokens in one than in the other, so a mean of micro-batch means would weigh them wrongly.
EXAMPLES = [
    Example("short", "Is it?", ("yes", "no"), 0),
    Example("short", "Why?", ("yes", "no"), 1),
    Example(
        "long",
        "A long question about the weather in a city far away, " * 4 + "rain or sun?",
        ("rain", "sun"),
        0,
    ),
    Example(
        "long",
        "Another long question about a river that crosses three countries, " * 4 + "which?",
        ("a", "b"),
        1,
    ),
]


def recipe_for(model_dir, tmp_path, contrastive_weight=0.01, **fields) -> TrainingRecipe:
    run = RunConfig(
        model=str(model_dir),
        tasks=["short", "long"],
        train_on_prompt=True,
        adapter={"lora_dropout": 0.0, "anchor": "all", "contrastive_weight": contrastive_weight},
        batch_size=2,
        grad_accum=2,
        max_steps=1,
        **fields,
    )
    base, tokenizer = load_base_model(run.model)
    torch.manual_seed(0)
    model = build_adapted_model(base, run)
    with torch.no_grad():  # B = 0 at init would make every expert output, and the contrastive loss, zero
        for name, p in model.named_parameters():
            if p.requires_grad and "router" not in name:
                p.normal_(0.0, 0.05)
    recipe = TrainingRecipe(
        model, tokenizer, EXAMPLES, ["short", "long"], run, tmp_path, Accelerator(cpu=True)
    )
    recipe.model.train()  # as `run` sets it: the auxiliary losses are computed in training forwards
    return recipe


def gradient(
    recipe: TrainingRecipe, micro_batches: list[list[int]]
) -> tuple[dict[str, float], list[torch.Tensor]]:
    recipe.optimizer.zero_grad(set_to_none=True)
    parts = recipe.accumulate([[recipe.encoded[i] for i in batch] for batch in micro_batches])
    return parts, [p.grad.clone() for p in recipe.params]


@pytest.mark.parametrize("method", ["comoe", "lora"])
def test_two_unequal_micro_batches_give_the_gradient_of_one_batch_holding_both(
    tiny_model_dir, tmp_path, method
):
    recipe = recipe_for(tiny_model_dir, tmp_path, method=method, contrastive_weight=0.1)
    labels = [sum(label != -100 for label in recipe.encoded[i].labels) for i in range(4)]
    assert labels[2] + labels[3] > 3 * (labels[0] + labels[1])  # the two micro-batches are far from equal
    split_parts, split = gradient(recipe, [[0, 1], [2, 3]])
    whole_parts, whole = gradient(recipe, [[0, 1, 2, 3]])
    for a, b in zip(split, whole, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert split_parts == pytest.approx(whole_parts, rel=1e-5)
    if method == "comoe":
        assert (
            split_parts["contrastive"] > 0 and split_parts["loss"] > split_parts["task"]
        )  # the aux term is in


def test_a_mean_of_micro_batch_means_would_differ(tiny_model_dir, tmp_path):
    """The test above can fail: the old normalisation (each micro-batch's mean, averaged) gives another
    gradient on the same micro-batches."""
    recipe = recipe_for(tiny_model_dir, tmp_path, method="lora")
    _, whole = gradient(recipe, [[0, 1, 2, 3]])
    recipe.optimizer.zero_grad(set_to_none=True)
    for batch in ([0, 1], [2, 3]):
        part = recipe.accumulate([[recipe.encoded[i] for i in batch]])  # each normalised by its own tokens
        assert part["task"] > 0
    halves = [p.grad / 2 for p in recipe.params]
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(halves, whole, strict=True))


@pytest.mark.parametrize(
    ("name", "warmup", "total", "expected"),
    [
        ("linear", 1, 1, [0.5]),  # --max-steps 1: its one step is the warm-up, at half the rate, not 0
        ("linear", 2, 5, [1 / 3, 2 / 3, 1.0, 2 / 3, 1 / 3]),
        ("cosine", 1, 3, [0.5, 1.0, 0.5]),
        ("constant", 0, 3, [1.0, 1.0, 1.0]),
        ("linear", 0, 2, [1.0, 0.5]),
    ],
)
def test_no_step_runs_at_rate_zero(name, warmup, total, expected):
    """Warm-up step i of w uses lr·(i+1)/(w+1); after it, transformers' schedule as it is."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = make_scheduler(name, optimizer, warmup, total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx(expected)


def test_a_log_written_with_the_old_keys_still_reads(tmp_path):
    """train_log.jsonl rows of earlier versions name the loss parts con and bal: read_train_log (and so a resume,
    whose training summary reads the log) gives them under contrastive and balance, as new rows have them."""
    log = tmp_path / "train_log.jsonl"
    old = {"loss": 2.5, "task": 2.4, "con": 1.2, "bal": 0.9, "step": 1, "epoch": 0, "lr": 0.001}
    new = {"loss": 2.3, "task": 2.2, "contrastive": 1.1, "balance": 0.8, "step": 2, "epoch": 0, "lr": 0.001}
    log.write_text(json.dumps(old) + "\n" + json.dumps(new) + "\n")
    rows = read_train_log(log)
    assert [set(row) for row in rows] == [set(new), set(new)]
    assert (rows[0]["contrastive"], rows[0]["balance"]) == (1.2, 0.9)
    truncate_train_log(log, 1)  # a resume from step 1 rewrites the log with the current names
    assert [json.loads(line) for line in log.read_text().splitlines()] == [
        {("contrastive" if k == "con" else "balance" if k == "bal" else k): v for k, v in old.items()}
    ]
