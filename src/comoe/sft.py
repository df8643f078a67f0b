"""``CoMoESFTTrainer``: TRL's ``SFTTrainer`` with CoMoE's auxiliary losses in the loss it optimises.

``transformers.Trainer`` optimises ``outputs.loss``, to which comoe adds λ·L_con (and the balance term).
TRL's ``SFTTrainer`` computes its loss itself, from the per-token log-probabilities of a fused LM head,
and adds only the router loss of transformers' own MoE models: given a ``CoMoEConfig`` as ``peft_config``
it would train the experts without the contrastive term and say nothing. This subclass adds the auxiliary
loss of the training forward, weighted by the micro-batch's share of the labelled tokens as comoe does
under ``Trainer``, so λ means the same under both. Needs the optional ``trl`` extra
(``pip install comoe[trl]``).

Not covered: DeepSpeed sequence parallelism (SFTTrainer then optimises ``outputs.loss``, which already
holds the term; this class refuses that setting rather than count it twice).
"""

from __future__ import annotations

from typing import Any

try:
    from trl import SFTTrainer
except ImportError as err:  # an optional extra
    raise ImportError("comoe.sft needs TRL, which is not installed: pip install 'comoe[trl]'") from err

from comoe.auxiliary import token_share
from comoe.tuner import CoMoETuner


class CoMoESFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` for CoMoE models: pass ``peft_config=CoMoEConfig(...)`` (or a comoe model)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        tuner = getattr(self.model, "base_model", None)
        if not isinstance(tuner, CoMoETuner):
            raise ValueError(
                "CoMoESFTTrainer trains CoMoE adapters: pass peft_config=CoMoEConfig(...) with a base model, or a "
                f"model made by comoe.get_comoe_model; got a {type(self.model).__name__} without CoMoE layers"
            )
        parallelism = getattr(self.accelerator, "parallelism_config", None)
        if parallelism is not None and getattr(parallelism, "sp_enabled", False):
            raise ValueError(
                "CoMoESFTTrainer does not support sequence parallelism (the auxiliary loss would be "
                "counted twice); train without it"
            )
        self._comoe_tuner = tuner

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tuner = self._comoe_tuner
        tuner.training_aux = None
        labels = inputs.get("labels")  # read before SFTTrainer's forward, which may pop it
        result = super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )
        aux = tuner.training_aux
        if aux is None:  # evaluation, or λ = 0 and no balance term
            return result
        extra = aux.total * token_share(labels, num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra
