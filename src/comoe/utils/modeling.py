"""Small facts about a (possibly wrapped) transformers model and its tokenizer, used by training,
evaluation and analysis alike."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


def accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the underlying transformers model can compute logits at chosen positions only."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return True
    # a wrapper: PEFT's get_base_model(), or CoMoEModel's registered ``base_model`` submodule
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model._modules.get("base_model")
    return inner is not None and accepts_logits_to_keep(inner)


def pad_token_id(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad token, else its EOS, else 0.

    Its value never matters to the results: padding is on the right and masked.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` of ``root`` is (a dotted path); returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def named_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The forward's arguments by name (positional ones bound through the signature, which models order
    differently: GPT-2's second parameter is past_key_values)."""
    if not args:
        return kwargs
    try:
        return inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments
    except TypeError:
        return kwargs


def token_shape(mask: Tensor | None, ids: Tensor | None) -> torch.Size | None:
    """(batch, seq) of this forward, from the attention mask or else from the token ids."""
    if isinstance(mask, Tensor) and mask.dim() == 2:
        return mask.shape
    if isinstance(ids, Tensor) and ids.dim() == 2:
        return ids.shape
    return None
