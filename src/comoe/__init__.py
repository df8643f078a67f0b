"""comoe: mixture-of-LoRA-experts adapters with the CoMoE contrastive objective, for any Hugging Face model."""

from comoe.config import CoMoEConfig
from comoe.layer import CoMoELayer
from comoe.losses import contrastive_loss, contrastive_loss_materialized, load_balancing_loss
from comoe.model import AdapterLoadError, AuxLosses, CoMoEModel, get_comoe_model
from comoe.records import RoutingRecorder
from comoe.tuner import CoMoETuner  # importing it registers CoMoE with PEFT

__all__ = [
    "AdapterLoadError",
    "AuxLosses",
    "CoMoEConfig",
    "CoMoELayer",
    "CoMoEModel",
    "CoMoETuner",
    "RoutingRecorder",
    "contrastive_loss",
    "contrastive_loss_materialized",
    "get_comoe_model",
    "load_balancing_loss",
]
__version__ = "0.1.0"
