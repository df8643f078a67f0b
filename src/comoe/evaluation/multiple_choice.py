"""Scoring protocols for multiple-choice :class:`~comoe.data.schema.Example` s.

``label`` (the paper's, inherited from MixLoRA): the prompt lists the options and ends with
``Answer:``; the prediction is the argmax of the next-token log-probabilities restricted to the first
token of each label " A", " B", ...

``loglik`` (lm-evaluation-harness style): context ``question + "\\nAnswer:"`` without the options,
continuation ``" " + choice``; the score is the summed log-probability of the continuation's tokens.
``acc_norm`` divides it by the character length of the choice text (as the harness does: the
length of the choice, not counting the leading space).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from comoe.data.prompts import choice_labels
from comoe.data.schema import Example
from comoe.evaluation.batches import (
    encode,
    eval_mode,
    forward_batches,
    prompt_sequences,
    special_prefix,
    truncate_left,
)
from comoe.utils.modeling import pad_token_id

MULTIPLE_CHOICE_PROTOCOLS = ("label", "loglik")

# Every label-protocol prompt ends with this; label tokens are read after it.
_PROMPT_END = "\nAnswer:"


def label_token_ids(tokenizer: PreTrainedTokenizerBase, num_choices: int) -> list[int]:
    """The token ids compared by the label protocol, one per choice (" A", " B", ...).

    Each id is the first token of the label as the tokenizer splits ``"...Answer:" + label``, i.e.
    the token the model emits right after the prompt. This is checked against tokenising the prompt
    end and the label separately: the prompt's tokens must be a prefix of the joint tokenisation
    (else the label merges into ``Answer:`` and the protocol is ill-posed), and a warning is issued
    if the label alone starts with another token (SentencePiece-style tokenizers can give a lone
    space token first). Raises if two labels share their first token.
    """
    context = encode(tokenizer, _PROMPT_END)
    ids: list[int] = []
    for label in choice_labels(num_choices):
        joint = encode(tokenizer, _PROMPT_END + label)
        if joint[: len(context)] != context or len(joint) == len(context):
            raise ValueError(f"the tokenizer merges the label {label!r} into the prompt end {_PROMPT_END!r}")
        token = joint[len(context)]
        alone = encode(tokenizer, label)
        if not alone or alone[0] != token:
            warnings.warn(
                f"label {label!r}: first token after the prompt is {token} but the label alone starts "
                f"with {alone[:1]}; scoring the former",
                stacklevel=2,
            )
        ids.append(token)
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels {choice_labels(num_choices)} do not have distinct first tokens: {ids}")
    return ids


def loglik_context(example: Example) -> str:
    """The loglik protocol's context: the question without its options."""
    return example.question.rstrip() + _PROMPT_END


def loglik_continuation(choice: str) -> str:
    """The loglik protocol's continuation: the choice after a space."""
    return " " + choice


def check_multiple_choice(examples: Sequence[Example], require_answer: bool = False) -> None:
    """Refuses an example that is not multiple choice (or, with ``require_answer``, has no answer)."""
    for ex in examples:
        if not ex.is_multiple_choice or (require_answer and ex.answer is None):
            raise ValueError(f"{ex.task}: not a multiple-choice example with an answer: {ex.question[:60]!r}")


# --------------------------------------------------------------------------- scorers


def score_label(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> list[list[float]]:
    """Per example, the next-token log-probabilities (over the full vocabulary) of its label tokens."""
    check_multiple_choice(examples)
    labels = {n: label_token_ids(tokenizer, n) for n in sorted({len(ex.choices) for ex in examples})}
    sequences = prompt_sequences(tokenizer, examples, max_length)
    scores: list[list[float]] = [[] for _ in examples]
    with eval_mode(model):
        batches = forward_batches(
            model, sequences, batch_size, pad_token_id(tokenizer), progress, "label", last_only=True
        )
        for indices, logits in batches:
            last = torch.log_softmax(logits.float(), dim=-1).cpu()  # one host sync
            for row, i in enumerate(indices):
                scores[i] = last[row, labels[len(examples[i].choices)]].tolist()
    return scores


def _loglik_request(
    tokenizer: PreTrainedTokenizerBase, prefix: list[int], context: str, continuation: str, max_length: int
) -> tuple[list[int], int]:
    """(token ids, number of trailing continuation tokens to score), harness style.

    The continuation's tokens are those of ``context + continuation`` past the context's own tokens.
    """
    context_ids = encode(tokenizer, context)
    whole = encode(tokenizer, context + continuation)
    n_target = len(whole) - len(context_ids)
    if n_target < 1:
        raise ValueError(f"continuation {continuation!r} adds no tokens to its context")
    sequence = truncate_left(prefix, whole, max_length)
    if n_target > len(sequence) - 1:
        raise ValueError(
            f"continuation {continuation!r} ({n_target} tokens) does not fit in max_length={max_length}"
        )
    return sequence, n_target


def score_loglik(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 16,
    max_length: int = 512,
    progress: bool = True,
) -> list[list[float]]:
    """Per example and choice, the summed log-probability of ``" " + choice`` after the context."""
    check_multiple_choice(examples)
    prefix = special_prefix(tokenizer)
    requests: list[tuple[list[int], int]] = []
    owners: list[int] = []
    for i, ex in enumerate(examples):
        context = loglik_context(ex)
        for choice in ex.choices:
            requests.append(
                _loglik_request(tokenizer, prefix, context, loglik_continuation(choice), max_length)
            )
            owners.append(i)
    flat: list[float] = [0.0] * len(requests)
    sequences = [ids for ids, _ in requests]
    with eval_mode(model):
        batches = forward_batches(model, sequences, batch_size, pad_token_id(tokenizer), progress, "loglik")
        for indices, logits in batches:
            rows: list[int] = []  # one entry per scored token: its row, position and target id
            positions: list[int] = []
            targets: list[int] = []
            for row, j in enumerate(indices):
                ids, n_target = requests[j]
                end = len(ids)
                rows += [row] * n_target
                positions += range(end - n_target - 1, end - 1)  # logits at p predict token p + 1
                targets += ids[end - n_target :]
            device = logits.device
            row_index = torch.tensor(rows, device=device)
            picked = logits[row_index, torch.tensor(positions, device=device)]
            token_lp = torch.log_softmax(picked.float(), dim=-1)
            token_lp = token_lp.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
            sums = torch.zeros(len(indices), device=device).index_add_(0, row_index, token_lp)
            for row, total in enumerate(sums.tolist()):
                flat[indices[row]] = total
    scores: list[list[float]] = [[] for _ in examples]
    for j, i in enumerate(owners):
        scores[i].append(flat[j])
    return scores
