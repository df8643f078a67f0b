"""Predictions for inputs that may carry no labels: for multiple choice the chosen option and every option's
score, for generation the generated text; optionally each answer judged against a label that is given, and
each input's routing (how many of its prompt tokens each routed layer sent to each expert).

Scoring is the evaluation's own (``score_label`` / ``score_loglik``, ``generate_answers``, the same prompt
format), so a prediction is what ``comoe eval`` would count.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from comoe.data.schema import Example
from comoe.evaluation.batches import eval_mode, forward_batches, prompt_sequences
from comoe.evaluation.generation import generate_answers, generation_result
from comoe.evaluation.multiple_choice import score_label, score_loglik
from comoe.routing_health import routed_layers
from comoe.utils.modeling import pad_token_id


def predict(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    protocol: str = "label",
    batch_size: int = 16,
    max_length: int = 512,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """One prediction per example, in order: ``{"choice", "prediction", "scores"}`` for multiple choice
    (``scores``: each option's log-probability under ``protocol``; ``prediction``: the chosen option's text),
    ``{"prediction"}`` for generation (the greedy answer's first line)."""
    rows: list[dict[str, Any]] = [{} for _ in examples]
    choice = [i for i, ex in enumerate(examples) if ex.is_multiple_choice]
    if choice:
        scorer = score_label if protocol == "label" else score_loglik
        picked = [examples[i] for i in choice]
        scores = scorer(
            model, tokenizer, picked, batch_size=batch_size, max_length=max_length, progress=progress
        )
        for i, option_scores in zip(choice, scores, strict=True):
            best = max(range(len(option_scores)), key=option_scores.__getitem__)
            rows[i] = {"choice": best, "prediction": examples[i].choices[best], "scores": option_scores}
    generation = [i for i, ex in enumerate(examples) if not ex.is_multiple_choice]
    if generation:
        prompts = [examples[i] for i in generation]
        answers = generate_answers(
            model,
            tokenizer,
            prompts,
            batch_size,
            max_length,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        for i, answer in zip(generation, answers, strict=True):
            rows[i] = {"prediction": answer}
    return rows


def judged(examples: Sequence[Example], rows: list[dict[str, Any]]) -> list[bool | None]:
    """Whether each prediction is right, judged as ``comoe eval`` judges (for generation: per task, numbers
    by their value where every given reference of the task is a number); None where no label is given."""
    correct: list[bool | None] = [None] * len(examples)
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        if ex.is_multiple_choice and ex.answer is not None:
            correct[i] = rows[i]["choice"] == ex.answer
        elif not ex.is_multiple_choice and ex.target is not None:
            by_task.setdefault(ex.task, []).append(i)
    for indices in by_task.values():
        hits = generation_result(
            [rows[i]["prediction"] for i in indices], [examples[i] for i in indices], keep=True
        )["hits"]
        for i, hit in zip(indices, hits, strict=True):
            correct[i] = hit
    return correct


def routing_per_example(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> list[dict[str, list[int]]]:
    """For each example, each routed layer's count of the prompt's tokens sent to each expert (a token
    counts once for every expert it uses): ``{layer name: [count of expert 0, 1, ...]}``."""
    layers = routed_layers(model)
    if not layers:
        return [{} for _ in examples]
    sequences = prompt_sequences(tokenizer, examples, max_length)
    used: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(router: nn.Module, _args: tuple, routing: Any) -> None:
            used[name] = routing.active(router.num_experts)

        return hook

    handles = [layer.router.register_forward_hook(keep(name)) for name, layer in layers.items()]
    counts: list[dict[str, list[int]]] = [{} for _ in examples]
    try:
        with eval_mode(model):
            batches = forward_batches(
                model, sequences, batch_size, pad_token_id(tokenizer), progress, "routing", last_only=True
            )
            for indices, _ in batches:
                lengths = torch.tensor([len(sequences[i]) for i in indices])
                for name, active in used.items():
                    per_row = active.view(len(indices), -1, active.shape[-1]).cpu()
                    real = torch.arange(per_row.shape[1])[None, :] < lengths[:, None]  # right padding
                    totals = (per_row & real[:, :, None]).sum(1)
                    for row, i in enumerate(indices):
                        counts[i][name] = totals[row].tolist()
    finally:
        for handle in handles:
            handle.remove()
    return counts
