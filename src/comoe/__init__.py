"""comoe: mixture-of-LoRA-experts adapters with the CoMoE contrastive objective, for any Hugging Face model.

``CoMoESFTTrainer``, ``CoMoEDPOTrainer`` and ``CoMoEGRPOTrainer`` (TRL's trainers with the auxiliary losses in
the loss they optimise; the ``trl`` extra) are imported when first read; ``with_aux_loss(TrainerCls)`` wraps
any other trainer that computes its own loss.
"""

import importlib
import logging

__version__ = "0.2.0"  # first: comoe.config writes it into every adapter_config.json


class _NoKernelDownloadNotice(logging.Filter):
    """Drops bitsandbytes' import-time notice that it could not fetch a CPU kernel from the Hugging Face
    hub ("Failed to load CPU gemm_4bit_forward from kernels-community ..."). comoe never downloads at run
    time, so the notice is only noise in every command; the logger's other messages pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


# bitsandbytes (when installed) logs it while PEFT imports it, so the filter goes on before any import below.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_NoKernelDownloadNotice())

from comoe.compiling import compile_layers  # noqa: E402
from comoe.config import CoMoEConfig  # noqa: E402
from comoe.layer import CoMoELayer  # noqa: E402
from comoe.losses import contrastive_loss, contrastive_loss_materialized, load_balancing_loss  # noqa: E402
from comoe.model import AdapterLoadError, AuxLosses, CoMoEModel, get_comoe_model  # noqa: E402
from comoe.moved import install as _install_moved_modules  # noqa: E402
from comoe.records import RoutingRecorder  # noqa: E402
from comoe.routing_health import RoutingHealthCallback  # noqa: E402
from comoe.trainers import AuxLossMixin, with_aux_loss  # noqa: E402
from comoe.tuner import CoMoETuner  # noqa: E402  (importing it registers CoMoE with PEFT)

_install_moved_modules()  # old module paths (comoe.adapters, comoe.train, ...) import with a warning

# TRL's trainers, imported when first read: `import comoe` loads no TRL
_TRL_TRAINERS = {
    "CoMoESFTTrainer": "comoe.sft",
    "CoMoEDPOTrainer": "comoe.alignment",
    "CoMoEGRPOTrainer": "comoe.alignment",
}


def __getattr__(name: str):
    if name in _TRL_TRAINERS:
        return getattr(importlib.import_module(_TRL_TRAINERS[name]), name)
    raise AttributeError(f"module 'comoe' has no attribute {name!r}")


__all__ = [  # without the TRL trainers, so that `from comoe import *` works without TRL
    "AdapterLoadError",
    "AuxLossMixin",
    "AuxLosses",
    "CoMoEConfig",
    "CoMoELayer",
    "CoMoEModel",
    "CoMoETuner",
    "RoutingHealthCallback",
    "RoutingRecorder",
    "compile_layers",
    "contrastive_loss",
    "contrastive_loss_materialized",
    "get_comoe_model",
    "load_balancing_loss",
    "with_aux_loss",
]
