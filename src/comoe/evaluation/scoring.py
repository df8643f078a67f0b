"""Accuracy per task and its macro average: multiple-choice tasks by their protocol
(:mod:`comoe.evaluation.multiple_choice`), generation tasks by their answers
(:mod:`comoe.evaluation.generation`); and the majority baseline."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from comoe.data.schema import Example
from comoe.evaluation.generation import generate_answers, generation_result, normalise_answer
from comoe.evaluation.multiple_choice import (
    MULTIPLE_CHOICE_PROTOCOLS,
    check_multiple_choice,
    score_label,
    score_loglik,
)


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the lowest index."""
    return max(range(len(values)), key=values.__getitem__)


def _task_result(predictions: list[int], examples: Sequence[Example]) -> dict[str, Any]:
    correct = sum(int(p == ex.answer) for p, ex in zip(predictions, examples, strict=True))
    return {"accuracy": correct / len(examples), "n": len(examples), "correct": correct}


def with_macro_average(protocol: str, per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-task results and their macro average, in the shape ``evaluate_tasks`` returns."""
    macro: dict[str, Any] = {"accuracy": sum(r["accuracy"] for r in per_task.values()) / len(per_task)}
    if all("acc_norm" in r for r in per_task.values()):
        macro["acc_norm"] = sum(r["acc_norm"] for r in per_task.values()) / len(per_task)
    macro["tasks"] = len(per_task)
    macro["n"] = sum(r["n"] for r in per_task.values())
    return {"protocol": protocol, "tasks": per_task, "macro": macro}


def _check_tasks(tasks: dict[str, list[Example]]) -> None:
    if not tasks:
        raise ValueError("no tasks to evaluate")
    for name, examples in tasks.items():
        if not examples:
            raise ValueError(f"task {name!r} has no examples")
        if is_generation_task(examples):
            if any(ex.is_multiple_choice or not ex.target for ex in examples):
                raise ValueError(f"task {name!r} mixes generation and multiple-choice examples")
        else:
            check_multiple_choice(examples, require_answer=True)


def is_generation_task(examples: Sequence[Example]) -> bool:
    return not examples[0].is_multiple_choice


def evaluate_tasks(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    tasks: dict[str, list[Example]],
    protocol: str = "label",
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Accuracy per task and its macro average.

    Returns ``{"protocol", "tasks": {task: {"accuracy", "n", "correct"}}, "macro": {"accuracy",
    "tasks", "n"}}``; with ``loglik`` each task also has ``"acc_norm"`` and ``"correct_norm"``, and
    ``macro`` has ``"acc_norm"``. ``macro.accuracy`` is the mean of the task accuracies and
    ``macro.n`` the total number of examples. With ``return_predictions`` each task also lists its
    predicted indices (``"predictions"``, and ``"predictions_norm"`` for loglik).
    All tasks are scored in one pass, so batches mix tasks.
    """
    if protocol not in MULTIPLE_CHOICE_PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {MULTIPLE_CHOICE_PROTOCOLS}")
    _check_tasks(tasks)
    per_task: dict[str, dict[str, Any]] = {}
    for name, examples in tasks.items():
        if is_generation_task(examples):
            answers = generate_answers(model, tokenizer, examples, batch_size, max_length, progress=progress)
            per_task[name] = generation_result(answers, examples, return_predictions)
    names = [name for name in tasks if name not in per_task]
    if not names:
        return with_macro_average(protocol, per_task)
    flat = [ex for name in names for ex in tasks[name]]
    scorer = score_label if protocol == "label" else score_loglik
    scores = scorer(model, tokenizer, flat, batch_size=batch_size, max_length=max_length, progress=progress)
    offset = 0
    for name in names:
        examples = tasks[name]
        task_scores = scores[offset : offset + len(examples)]
        offset += len(examples)
        predictions = [_argmax(s) for s in task_scores]
        result = _task_result(predictions, examples)
        if protocol == "loglik":
            predictions_norm = [
                _argmax([score / max(len(choice), 1) for score, choice in zip(s, ex.choices, strict=True)])
                for s, ex in zip(task_scores, examples, strict=True)
            ]
            norm = _task_result(predictions_norm, examples)
            result.update(acc_norm=norm["accuracy"], correct_norm=norm["correct"])
            if return_predictions:
                result["predictions_norm"] = predictions_norm
        if return_predictions:
            result["predictions"] = predictions
            result["answers"] = [ex.answer for ex in examples]
        per_task[name] = result
    return with_macro_average(protocol, {name: per_task[name] for name in tasks})


def majority_baseline(train: dict[str, list[Example]], test: dict[str, list[Example]]) -> dict[str, Any]:
    """Per task, always predict the answer index most frequent in its train set (ties: lowest index)."""
    _check_tasks(test)
    per_task: dict[str, dict[str, Any]] = {}
    for name, examples in test.items():
        if is_generation_task(examples):
            targets = Counter(normalise_answer(ex.target or "") for ex in train.get(name, []))
            common = targets.most_common(1)[0][0] if targets else ""
            per_task[name] = generation_result([common] * len(examples), examples, keep=False)
            continue
        answers = Counter(ex.answer for ex in train.get(name, []) if ex.answer is not None)
        if not answers:
            raise ValueError(f"task {name!r} has no labelled train examples for the majority baseline")
        top = max(answers.values())
        majority = min(a for a, count in answers.items() if count == top)
        per_task[name] = _task_result([majority] * len(examples), examples) | {"majority": majority}
    return with_macro_average("majority", per_task)
