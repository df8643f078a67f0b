"""Turn Examples into padded training batches: prompt + answer, loss on the answer tokens by default."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from comoe.data.prompts import answer_text, format_prompt
from comoe.data.schema import Example

IGNORE_INDEX = -100


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    task_id: int


def encode_example(
    example: Example, tokenizer, task_id: int, max_length: int, train_on_prompt: bool = False
) -> EncodedExample:
    """Tokenise prompt and answer separately (so the boundary is exact) and join them.

    The answer ends with EOS. A prompt too long for ``max_length`` loses tokens from its start, so the
    answer and the end of the question always survive.
    """
    prompt_ids = tokenizer(format_prompt(example), add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer_text(example), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    answer_ids = answer_ids[:max_length]
    prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(answer_ids) - max_length) :]
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return EncodedExample(list(prompt_ids) + answer_ids, prompt_labels + answer_ids, task_id)


def collate(batch: list[EncodedExample], pad_token_id: int) -> dict[str, Tensor]:
    """Right-pad to the longest sequence of the batch."""
    width = max(len(item.input_ids) for item in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        input_ids[row, :n] = torch.tensor(item.input_ids)
        labels[row, :n] = torch.tensor(item.labels)
        attention_mask[row, :n] = 1
    task_ids = torch.tensor([item.task_id for item in batch], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_ids": task_ids}


def check_lengths(examples: list[Example], tokenizer, max_length: int, note_truncation: bool = True) -> None:
    """Refuse a ``max_length`` that leaves some example no prompt token before its answer; note truncation.

    With too short a limit the answer fills the whole window (or is cut), the loss has nothing to predict
    from and a run trains on NaN or on answers without questions; better to stop before training starts.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    answers = [
        len(tokenizer(answer_text(ex), add_special_tokens=False)["input_ids"]) + len(eos) for ex in examples
    ]
    need = max(answers) + 1
    if max_length < need:
        worst = examples[answers.index(max(answers))]
        raise ValueError(
            f"max_length={max_length} is too short: an answer of task {worst.task!r} takes {max(answers)} tokens "
            f"(with end-of-sequence), leaving no room for its question; give --max-length {need} or more"
            f"{' (a few times that, to keep the questions)' if need < 64 else ''}"
        )
    totals = [
        len(tokenizer(format_prompt(ex), add_special_tokens=True)["input_ids"]) + a
        for ex, a in zip(examples, answers, strict=True)
    ]
    cut = sum(total > max_length for total in totals)
    if cut and note_truncation:
        print(
            f"note: {cut} of {len(examples)} training examples are longer than max_length={max_length} tokens "
            f"and lose the start of their prompt (the longest needs {max(totals)})"
        )
