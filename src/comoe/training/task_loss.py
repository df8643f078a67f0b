"""The task loss: next-token cross-entropy over the labelled tokens, as training and validation compute it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from comoe.data.batching import IGNORE_INDEX


def label_tokens(labels: torch.Tensor) -> int:
    """The tokens a causal LM predicts a label for (labels are shifted by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def causal_lm_loss(
    model, batch: dict[str, torch.Tensor], trim: bool, reduction: str = "mean"
) -> tuple[torch.Tensor, object]:
    """Next-token cross-entropy over labelled tokens (the task loss; their mean, or with ``reduction="sum"``
    their sum), and the model outputs.

    With ``trim`` the output head runs only at positions that predict a label: with the loss on answer
    tokens, a few positions per row instead of all of them (the head is ~20% of SmolLM2's compute).
    """
    # a copy (the caller's batch keeps its labels); training builds no KV cache
    batch = {**batch, "use_cache": False}
    labels = batch.pop("labels")
    targets = labels[:, 1:]
    if not trim:
        out = model(**batch)
        logits = out.logits[:, :-1]
    else:
        positions = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        out = model(**batch, logits_to_keep=positions)
        logits, targets = out.logits, targets[:, positions]
    task_loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction=reduction,
    )
    return task_loss, out
