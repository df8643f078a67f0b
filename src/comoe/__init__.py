"""comoe: mixture-of-LoRA-experts adapters with the CoMoE contrastive objective, for any Hugging Face model."""

import logging

# bitsandbytes (when installed; PEFT imports it) warns at import that it cannot download a CPU kernel
# from the Hugging Face hub. comoe never downloads at run time, so that warning is only noise in every
# command; other bitsandbytes messages are kept.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from comoe.config import CoMoEConfig  # noqa: E402
from comoe.layer import CoMoELayer  # noqa: E402
from comoe.losses import contrastive_loss, contrastive_loss_materialized, load_balancing_loss  # noqa: E402
from comoe.model import AdapterLoadError, AuxLosses, CoMoEModel, get_comoe_model  # noqa: E402
from comoe.records import RoutingRecorder  # noqa: E402
from comoe.tuner import CoMoETuner  # noqa: E402  (importing it registers CoMoE with PEFT)

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
