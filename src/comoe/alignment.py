"""TRL's preference and reinforcement-learning trainers for CoMoE adapters: ``CoMoEDPOTrainer``,
``CoMoEGRPOTrainer``.

Both compute their loss from log-probabilities and would drop the contrastive term; ``AuxLossMixin``
(``comoe.trainers``) adds the auxiliary loss of the policy's training forward inside ``compute_loss``.
Their other forwards run under ``no_grad`` and add nothing: DPO's reference log-probabilities (the base,
the adapter disabled, in ``compute_loss``, or precomputed), GRPO's generation, old and reference
log-probabilities (in ``_prepare_inputs``). Needs the optional ``trl`` extra (``pip install 'comoe[trl]'``).
"""

from __future__ import annotations

try:
    from trl import DPOTrainer, GRPOTrainer
except ImportError as err:  # an optional extra
    raise ImportError("comoe.alignment needs TRL, which is not installed: pip install 'comoe[trl]'") from err

from comoe.trainers import AuxLossMixin


class CoMoEDPOTrainer(AuxLossMixin, DPOTrainer):
    """``trl.DPOTrainer`` for CoMoE models. DPO's loss is a mean over the micro-batch's pairs, which
    ``Trainer`` divides by the accumulation steps: the auxiliary loss takes weight 1 beside it, so a step
    adds λ times the mean of its micro-batches' L_con."""


class CoMoEGRPOTrainer(AuxLossMixin, GRPOTrainer):
    """``trl.GRPOTrainer`` for CoMoE models. GRPO normalises its loss over the accumulated batch itself and its micro-batches hold equally many
    completions: the auxiliary loss takes weight 1 / the accumulation steps, so a step adds λ times the mean
    of its micro-batches' L_con, whatever the ``loss_type``."""
