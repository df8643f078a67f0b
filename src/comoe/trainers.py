"""CoMoE's auxiliary losses under a trainer that computes its own loss: ``AuxLossMixin``, ``with_aux_loss``.

comoe adds the auxiliary losses (λ·L_con and the balance term) to ``outputs.loss``, which
``transformers.Trainer`` optimises. TRL's trainers (SFT, DPO, GRPO, KTO, ...) compute their loss from
log-probabilities and never read ``outputs.loss``: with a CoMoE adapter they would train as if λ were 0.
``AuxLossMixin`` wraps any ``Trainer`` subclass's ``compute_loss`` and adds the term back:

- **Which forwards.** The auxiliary loss of every forward *inside* ``compute_loss`` that runs in training
  mode with autograd on (the policy forward); several such forwards add their mean. Forwards under
  ``no_grad`` add nothing: a reference forward with the adapter disabled (DPO, GRPO), old log-probabilities
  and generation (GRPO's ``_prepare_inputs``, which runs before ``compute_loss``), and evaluation.
- **Counted once.** When the trainer's loss already reaches the auxiliary loss through autograd (a trainer
  that optimises ``outputs.loss``, as ``transformers.Trainer`` does), nothing is added. This is checked on
  the first training step by walking the loss's autograd graph (no computation) and kept.
- **Weighted per micro-batch** (``aux_loss_weight``) so that an optimizer step adds λ·L_con of the step's
  batch whatever the gradient accumulation, as under ``Trainer``: a loss that ``Trainer.training_step``
  divides by the accumulation steps (DPO's mean over pairs, KTO) takes weight 1; a loss already normalised
  over the accumulated batch takes the micro-batch's share of the labelled tokens when the trainer passes
  ``num_items_in_batch`` (SFT: comoe's own rule, ``comoe.auxiliary.token_share``), else 1 / the
  accumulation steps (GRPO, whose micro-batches hold equally many completions).

Refused: a model without a CoMoE adapter; sequence parallelism; a mixture-of-experts base whose router loss
TRL would read from ``outputs.aux_loss`` (comoe's field for the adapter's loss).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from comoe.auxiliary import AuxLosses, token_share
from comoe.tuner import CoMoETuner


class TrainingForwards:
    """The auxiliary losses of the training forwards of the model while open (a forward hook's list)."""

    def __init__(self, tuner: CoMoETuner):
        self.tuner = tuner
        self.losses: list[AuxLosses] | None = None  # None: closed, nothing is collected

    def __call__(self, module: nn.Module, args: tuple, outputs: Any) -> None:
        aux = self.tuner.last_aux  # set by the tuner's own hook, which runs before this one
        if self.losses is not None and aux is not None and module.training and torch.is_grad_enabled():
            self.losses.append(aux)


def comoe_tuner(model: nn.Module, trainer: str) -> CoMoETuner:
    """The CoMoE tuner of a trainer's model, or a ValueError saying what the trainer needs."""
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, CoMoETuner):
        raise ValueError(
            f"{trainer} trains CoMoE adapters: pass peft_config=CoMoEConfig(...) with a base model, or a model "
            f"made by comoe.get_comoe_model; got a {type(model).__name__} without CoMoE layers"
        )
    return tuner


def reaches(loss: Tensor, target: Tensor) -> bool:
    """Whether ``loss``'s autograd graph leads to ``target`` (walks the graph's nodes, computes nothing)."""
    goal, start = target.grad_fn, getattr(loss, "grad_fn", None)
    if goal is None or start is None:
        return False
    seen, stack = {start}, [start]
    while stack:
        node = stack.pop()
        if node is goal:
            return True
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return False


class AuxLossMixin:
    """Adds a CoMoE adapter's auxiliary loss to the loss of a ``transformers.Trainer`` subclass.

    Put it first among the bases: ``class MyTrainer(AuxLossMixin, trl.KTOTrainer): pass``, or
    ``with_aux_loss(trl.KTOTrainer)``. The model must hold a CoMoE adapter after the trainer's ``__init__``
    (``peft_config=CoMoEConfig(...)``, or a model made by ``comoe.get_comoe_model``)."""

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        # a class ahead of the mixin that defines compute_loss and is not built on it: the mixin's never runs
        ahead = [c for c in mro[: mro.index(AuxLossMixin)] if "compute_loss" in vars(c)]
        shadowing = [c for c in ahead if not issubclass(c, AuxLossMixin)]
        if shadowing:
            raise TypeError(
                f"put AuxLossMixin before {shadowing[0].__name__} among the bases of {cls.__name__}"
            )

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        name = type(self).__name__
        tuner = comoe_tuner(self.model, name)
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError(
                f"{name} does not support sequence parallelism (the auxiliary loss could be counted twice); "
                "train without it"
            )
        # TRL adds a mixture-of-experts base's router loss, read from outputs.aux_loss
        if getattr(self, "aux_loss_enabled", False):
            raise ValueError(
                f"{name}: the base model is a mixture of experts whose router loss TRL reads from "
                "outputs.aux_loss, the field where comoe puts the adapter's auxiliary loss, so it would count "
                "comoe's loss under router_aux_loss_coef instead of the base's: pass router_aux_loss_coef=0.0 "
                "in the trainer's config"
            )
        self._comoe_tuner = tuner
        self._comoe_forwards = TrainingForwards(tuner)
        # after the tuner's hooks, so it sees each forward's losses; it holds no reference to the trainer
        self._comoe_hook = tuner.model.register_forward_hook(self._comoe_forwards)
        self._comoe_aux_in_loss: bool | None = None  # whether the trainer's own loss holds it (first step)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        labels = inputs.get("labels") if hasattr(inputs, "get") else None  # before a forward pops it
        forwards = self._comoe_forwards
        forwards.losses = []
        try:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            collected = forwards.losses
        finally:
            forwards.losses = None
        if not collected:  # evaluation, or no auxiliary loss (λ = 0 and no balance term)
            return result
        loss, outputs = result if return_outputs else (result, None)
        if self._comoe_aux_in_loss is None:
            self._comoe_aux_in_loss = any(reaches(loss, aux.total) for aux in collected)
        if self._comoe_aux_in_loss:
            return result
        aux = collected[0].total if len(collected) == 1 else torch.stack([a.total for a in collected]).mean()
        loss = loss + aux * self.aux_loss_weight(labels, num_items_in_batch)
        return (loss, outputs) if return_outputs else loss

    def aux_loss_weight(
        self, labels: Tensor | None, num_items_in_batch: Tensor | int | None
    ) -> Tensor | float:
        """The weight of this micro-batch's auxiliary loss, such that an optimizer step adds λ·L_con of its
        batch (module docstring). Override it for a trainer whose loss is normalised another way."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:  # as Trainer.training_step decides it
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        if not scaled:  # training_step divides the loss by the accumulation steps
            return 1.0
        if labels is not None and num_items_in_batch is not None:
            share = token_share(labels, num_items_in_batch)
            if self.args.average_tokens_across_devices:  # num_items_in_batch counts every rank's tokens
                tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
                share = share * (self.accelerator.num_processes // tp_size)
            return share
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        return 1.0 / steps


_WRAPPED: dict[type, type] = {}


def with_aux_loss(trainer_cls: type) -> type:
    """``trainer_cls`` (a ``transformers.Trainer`` subclass) with ``AuxLossMixin``: ``CoMoE<Name>``, made once
    per class. ``comoe.with_aux_loss(trl.KTOTrainer)(model=..., peft_config=CoMoEConfig(...), ...)``."""
    from transformers import Trainer

    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"with_aux_loss takes a transformers.Trainer subclass, got {trainer_cls!r}")
    if issubclass(trainer_cls, AuxLossMixin):
        return trainer_cls
    if trainer_cls not in _WRAPPED:
        name = f"CoMoE{trainer_cls.__name__}"
        doc = f"``{trainer_cls.__module__}.{trainer_cls.__qualname__}`` with CoMoE's auxiliary loss (AuxLossMixin)."
        _WRAPPED[trainer_cls] = type(
            name, (AuxLossMixin, trainer_cls), {"__doc__": doc, "__module__": __name__}
        )
    return _WRAPPED[trainer_cls]
