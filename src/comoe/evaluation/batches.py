"""What the scorers share: the tokenizer's special prefix, encoding and left truncation, evaluation mode,
and batched forwards.

Sequences are padded on the right, so each real token keeps the position ids it has unpadded, and
the logits needed are gathered at each row's own positions; batches are sorted by length to cut
padding. Prompts longer than ``max_length`` tokens are cut from the left (after any BOS-like tokens
the tokenizer prepends), so the end of the prompt, where the answer is read, is always kept.
The model is only called as ``model(input_ids=..., attention_mask=...)`` and only ``.logits`` is
read, so wrappers that forward ``**kwargs`` to a Hugging Face causal LM work too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from comoe.data.prompts import format_prompt
from comoe.data.schema import Example
from comoe.utils.modeling import accepts_logits_to_keep, model_device


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


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """``text``'s token ids, without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def truncate_left(prefix: list[int], body: list[int], max_length: int) -> list[int]:
    """``prefix`` and as much of the end of ``body`` as fits in ``max_length`` tokens."""
    keep = max_length - len(prefix)
    if keep < 1:
        raise ValueError(f"max_length={max_length} leaves no room after {len(prefix)} special tokens")
    return prefix + body[-keep:]


def prompt_sequences(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], max_length: int
) -> list[list[int]]:
    """Each example's prompt as the model reads it: the special prefix, then the formatted prompt, cut
    from the left to ``max_length``."""
    prefix = special_prefix(tokenizer)
    return [truncate_left(prefix, encode(tokenizer, format_prompt(ex)), max_length) for ex in examples]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode without gradients, restored to its training mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def forward_batches(
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
