"""``CoMoESFTTrainer``: TRL's ``SFTTrainer`` with CoMoE's auxiliary losses in the loss it optimises.

``transformers.Trainer`` optimises ``outputs.loss``, to which comoe adds λ·L_con (and the balance term).
TRL's ``SFTTrainer`` computes its loss itself, from the per-token log-probabilities of a fused LM head,
and adds only the router loss of transformers' own MoE models: given a ``CoMoEConfig`` as ``peft_config``
it would train the experts without the contrastive term and say nothing. ``comoe.trainers.AuxLossMixin``
adds the auxiliary loss of the training forward, weighted by the micro-batch's share of the labelled
tokens as comoe does under ``Trainer``, so λ means the same under both. Needs the optional ``trl`` extra
(``pip install 'comoe[trl]'``). DPO and GRPO: ``comoe.alignment``.
"""

from __future__ import annotations

try:
    from trl import SFTTrainer
except ImportError as err:  # an optional extra
    raise ImportError("comoe.sft needs TRL, which is not installed: pip install 'comoe[trl]'") from err

from comoe.trainers import AuxLossMixin


class CoMoESFTTrainer(AuxLossMixin, SFTTrainer):
    """``trl.SFTTrainer`` for CoMoE models: pass ``peft_config=CoMoEConfig(...)`` (or a comoe model)."""
