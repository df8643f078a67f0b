"""Scoring protocols for multiple-choice :class:`~comoe.data.schema.Example` s.

``label`` (the paper's, inherited from MixLoRA): the prompt lists the options and ends with
``Answer:``; the prediction is the argmax of the next-token log-probabilities restricted to the first
token of each label " A", " B", ...

``loglik`` (lm-evaluation-harness style): context ``question + "\\nAnswer:"`` without the options,
continuation ``" " + choice``; the score is the summed log-probability of the continuation's tokens.
``acc_norm`` divides it by the character length of the choice text (as the harness does: the
length of the choice, not counting the leading space).

Sequences are padded on the right, so each real token keeps the position ids it has unpadded, and
the logits needed are gathered at each row's own positions; batches are sorted by length to cut
padding. Prompts longer than ``max_length`` tokens are cut from the left (after any BOS-like tokens
the tokenizer prepends), so the end of the prompt, where the answer is read, is always kept.
The model is only called as ``model(input_ids=..., attention_mask=...)`` and only ``.logits`` is
read, so wrappers that forward ``**kwargs`` to a Hugging Face causal LM work too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from comoe.data.prompts import choice_labels, format_prompt
from comoe.data.schema import Example
from comoe.evaluation.numeric import is_number, numbers_match
from comoe.utils.modeling import accepts_logits_to_keep, model_device, pad_token_id

PROTOCOLS = ("label", "loglik")

# Every label-protocol prompt ends with this; label tokens are read after it.
_PROMPT_END = "\nAnswer:"


# --------------------------------------------------------------------------- tokenisation


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the tokenizer puts before any text (e.g. Llama's BOS); empty for GPT-2/SmolLM2.

    Special tokens the tokenizer appends (an EOS) are deliberately not used: the model must predict
    what follows the prompt.
    """
    probe = "x"
    with_special = tokenizer(probe, add_special_tokens=True)["input_ids"]
    plain = tokenizer(probe, add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return list(with_special[:start])
    return []


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_token_ids(tokenizer: PreTrainedTokenizerBase, num_choices: int) -> list[int]:
    """The token ids compared by the label protocol, one per choice (" A", " B", ...).

    Each id is the first token of the label as the tokenizer splits ``"...Answer:" + label``, i.e.
    the token the model emits right after the prompt. This is checked against tokenising the prompt
    end and the label separately: the prompt's tokens must be a prefix of the joint tokenisation
    (else the label merges into ``Answer:`` and the protocol is ill-posed), and a warning is issued
    if the label alone starts with another token (SentencePiece-style tokenizers can give a lone
    space token first). Raises if two labels share their first token.
    """
    context = _encode(tokenizer, _PROMPT_END)
    ids: list[int] = []
    for label in choice_labels(num_choices):
        joint = _encode(tokenizer, _PROMPT_END + label)
        if joint[: len(context)] != context or len(joint) == len(context):
            raise ValueError(f"the tokenizer merges the label {label!r} into the prompt end {_PROMPT_END!r}")
        token = joint[len(context)]
        alone = _encode(tokenizer, label)
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


def _truncate_left(prefix: list[int], body: list[int], max_length: int) -> list[int]:
    keep = max_length - len(prefix)
    if keep < 1:
        raise ValueError(f"max_length={max_length} leaves no room after {len(prefix)} special tokens")
    return prefix + body[-keep:]


def loglik_context(example: Example) -> str:
    """The loglik protocol's context: the question without its options."""
    return example.question.rstrip() + _PROMPT_END


def loglik_continuation(choice: str) -> str:
    return " " + choice


# --------------------------------------------------------------------------- batched forward


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _forward_batches(
    model: nn.Module,
    sequences: Sequence[list[int]],
    batch_size: int,
    pad_id: int,
    progress: bool,
    desc: str,
    last_only: bool = False,
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (indices into ``sequences``, logits [B, L, V]) over right-padded, length-sorted batches.

    With ``last_only`` the logits are [B, V] at each sequence's last token; where the model supports
    ``logits_to_keep`` its output head then runs at those few positions only.
    """
    trim = last_only and accepts_logits_to_keep(model)
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = model_device(model)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # longest first: OOM early
    with tqdm(total=len(sequences), desc=desc, unit="seq", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            indices = order[start : start + batch_size]
            width = max(len(sequences[i]) for i in indices)
            input_ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(indices), width), dtype=torch.long)
            for row, i in enumerate(indices):
                input_ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                attention_mask[row, : len(sequences[i])] = 1
            kwargs = {}
            if last_only:
                last = torch.tensor([len(sequences[i]) - 1 for i in indices])
                kept, where = torch.unique(last, return_inverse=True)
                if trim:
                    kwargs["logits_to_keep"] = kept.to(device)
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs
            ).logits
            if last_only:
                rows = torch.arange(len(indices), device=logits.device)
                logits = logits[rows, (where if trim else last).to(logits.device)]
            yield indices, logits
            bar.update(len(indices))


def _check_multiple_choice(examples: Sequence[Example], require_answer: bool = False) -> None:
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
    _check_multiple_choice(examples)
    prefix = special_prefix(tokenizer)
    labels = {n: label_token_ids(tokenizer, n) for n in sorted({len(ex.choices) for ex in examples})}
    sequences = [_truncate_left(prefix, _encode(tokenizer, format_prompt(ex)), max_length) for ex in examples]
    scores: list[list[float]] = [[] for _ in examples]
    with _eval_mode(model):
        batches = _forward_batches(
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
    context_ids = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    n_target = len(whole) - len(context_ids)
    if n_target < 1:
        raise ValueError(f"continuation {continuation!r} adds no tokens to its context")
    sequence = _truncate_left(prefix, whole, max_length)
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
    _check_multiple_choice(examples)
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
    with _eval_mode(model):
        batches = _forward_batches(model, sequences, batch_size, pad_token_id(tokenizer), progress, "loglik")
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


# --------------------------------------------------------------------------- accuracy


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; ties go to the lowest index."""
    return max(range(len(values)), key=values.__getitem__)


def _task_result(predictions: list[int], examples: Sequence[Example]) -> dict[str, Any]:
    correct = sum(int(p == ex.answer) for p, ex in zip(predictions, examples, strict=True))
    return {"accuracy": correct / len(examples), "n": len(examples), "correct": correct}


def summarise(protocol: str, per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
            _check_multiple_choice(examples, require_answer=True)


def is_generation_task(examples: Sequence[Example]) -> bool:
    return not examples[0].is_multiple_choice


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
            _eval_mode(model),
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


def _generation_result(answers: list[str], examples: Sequence[Example], keep: bool) -> dict[str, Any]:
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
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    _check_tasks(tasks)
    per_task: dict[str, dict[str, Any]] = {}
    for name, examples in tasks.items():
        if is_generation_task(examples):
            answers = generate_answers(model, tokenizer, examples, batch_size, max_length, progress=progress)
            per_task[name] = _generation_result(answers, examples, return_predictions)
    names = [name for name in tasks if name not in per_task]
    if not names:
        return summarise(protocol, per_task)
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
    return summarise(protocol, {name: per_task[name] for name in tasks})


def majority_baseline(train: dict[str, list[Example]], test: dict[str, list[Example]]) -> dict[str, Any]:
    """Per task, always predict the answer index most frequent in its train set (ties: lowest index)."""
    _check_tasks(test)
    per_task: dict[str, dict[str, Any]] = {}
    for name, examples in test.items():
        if is_generation_task(examples):
            targets = Counter(normalise_answer(ex.target or "") for ex in train.get(name, []))
            common = targets.most_common(1)[0][0] if targets else ""
            per_task[name] = _generation_result([common] * len(examples), examples, keep=False)
            continue
        answers = Counter(ex.answer for ex in train.get(name, []) if ex.answer is not None)
        if not answers:
            raise ValueError(f"task {name!r} has no labelled train examples for the majority baseline")
        top = max(answers.values())
        majority = min(a for a, count in answers.items() if count == top)
        per_task[name] = _task_result([majority] * len(examples), examples) | {"majority": majority}
    return summarise("majority", per_task)
