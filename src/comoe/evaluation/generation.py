"""Generation tasks: greedy answers and their scoring (exact match, or numbers by their value)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from comoe.data.prompts import format_prompt
from comoe.data.schema import Example
from comoe.evaluation.batches import eval_mode
from comoe.evaluation.numeric import is_number, numbers_match
from comoe.utils.modeling import model_device, pad_token_id


def normalise_answer(text: str) -> str:
    """Exact-match normalisation: case, surrounding punctuation and whitespace runs do not count."""
    return " ".join(text.lower().split()).strip(" .!?\"'")


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 512,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to generation prompts (first line of the continuation).

    Generation pads on the left (the new tokens must follow every prompt directly); ``generate``
    derives position ids from the attention mask, so padding does not shift positions.
    """
    device = model_device(model)
    prompts = [format_prompt(ex) for ex in examples]
    answers: list[str] = []
    saved = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    try:
        with (
            eval_mode(model),
            tqdm(total=len(prompts), desc="generate", unit="seq", disable=not progress) as bar,
        ):
            for start in range(0, len(prompts), batch_size):
                enc = tokenizer(
                    prompts[start : start + batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                ).to(device)
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=pad_token_id(tokenizer),
                )
                texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                answers += [text.strip().split("\n")[0] for text in texts]
                bar.update(len(texts))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = saved
    return answers


def generation_result(answers: list[str], examples: Sequence[Example], keep: bool) -> dict[str, Any]:
    """Exact match after normalisation; a task whose every reference is a number is scored by the final
    number of each answer instead (``numeric_match``: "$1,200." answers 1200)."""
    numeric = all(is_number(ex.target or "") for ex in examples)
    if numeric:
        hits = [numbers_match(a, ex.target or "") for a, ex in zip(answers, examples, strict=True)]
    else:
        hits = [
            normalise_answer(a) == normalise_answer(ex.target or "")
            for a, ex in zip(answers, examples, strict=True)
        ]
    correct = sum(hits)
    result = {
        "accuracy": correct / len(examples),
        "n": len(examples),
        "correct": correct,
        "metric": "numeric_match" if numeric else "exact_match",
    }
    if keep:
        result["predictions"] = answers
        result["answers"] = [ex.target for ex in examples]
        result["hits"] = hits  # what the statistics pair: the same judgement as the accuracy
    return result
