"""The code files of an exported model folder (`comoe export`): what `trust_remote_code` runs.

``comoe_inference.py`` is the source of ``comoe.inference`` as it is, the functions the library's layers
call on their inference path and the modules that compose them; it imports torch only. The two other
files are a few lines each, written from the templates below for the base architecture: a config class
and a model class that subclass transformers' own for that architecture, the model class putting a
mixture in place of every module that config.json's "comoe" entry names. So the folder needs torch and
transformers, not comoe nor PEFT.
"""

from __future__ import annotations

import inspect

import transformers
from torch import nn

import comoe.inference

INFERENCE_FILE = "comoe_inference.py"
CONFIG_FILE = "configuration_comoe.py"
MODELING_FILE = "modeling_comoe.py"
MODEL_TYPE = (
    "comoe"  # not the base's: nothing loads the folder as the bare base, which would drop the experts
)
CONFIG_CLASS = "CoMoEConfig"
MODEL_CLASS = "CoMoEForCausalLM"
AUTO_MAP = {
    "AutoConfig": f"{CONFIG_FILE.removesuffix('.py')}.{CONFIG_CLASS}",
    "AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{MODEL_CLASS}",
}

_CONFIG_TEMPLATE = '''"""The config of a {model_name} with comoe mixtures of LoRA experts (exported by comoe {version}).

Its fields are the base model's ({config_name}); "comoe" in config.json names the adapted modules and
their experts. Its model_type is "{model_type}", so that the folder never loads as the bare base
architecture, which would leave the experts out.
"""

{config_import} as BaseConfig


class {config_class}(BaseConfig):
    model_type = "{model_type}"
'''

_MODELING_TEMPLATE = '''"""A {model_name} whose adapted modules are comoe mixtures of LoRA experts, for inference (exported
by comoe {version}).

The base architecture is transformers' own, built from config.json; every module that config.json's
"comoe" entry names is replaced by a mixture that holds it ({inference_file}: comoe's own inference
code, torch only), and the weights load by their names. Load it with
AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).
"""

{model_import} as BaseModel
from transformers.pytorch_utils import Conv1D

from .{inference_module} import attach_mixtures
from .{config_module} import {config_class}


class {model_class}(BaseModel):
    config_class = {config_class}
    # the routers and experts stay fp32 whatever dtype the base loads in, as comoe keeps them
    _keep_in_fp32_modules_strict = [*(BaseModel._keep_in_fp32_modules_strict or []), "comoe_"]

    def __init__(self, config):
        super().__init__(config)
        attach_mixtures(self, config.comoe["layers"], transposed=lambda module: isinstance(module, Conv1D))
'''


def code_files(model: nn.Module, version: str) -> dict[str, str]:
    """The three code files of an export of ``model`` (a transformers causal LM, its adapted modules in
    place), by file name."""
    config_import = _import_line(type(model.config))
    model_import = _import_line(type(model))
    names = dict(
        model_name=type(model).__name__,
        config_name=type(model.config).__name__,
        version=version,
        model_type=MODEL_TYPE,
        config_class=CONFIG_CLASS,
        model_class=MODEL_CLASS,
        inference_file=INFERENCE_FILE,
        inference_module=INFERENCE_FILE.removesuffix(".py"),
        config_module=CONFIG_FILE.removesuffix(".py"),
    )
    return {
        INFERENCE_FILE: inspect.getsource(comoe.inference),
        CONFIG_FILE: _CONFIG_TEMPLATE.format(config_import=config_import, **names),
        MODELING_FILE: _MODELING_TEMPLATE.format(model_import=model_import, **names),
    }


def base_class_problem(model: nn.Module) -> str | None:
    """Why ``model``'s architecture cannot be the base of an export (its classes are not transformers'
    own, so the folder could not import them), or None."""
    for cls in (type(model), type(model.config)):
        if not cls.__module__.startswith("transformers."):
            return (
                f"{cls.__name__} comes from {cls.__module__}, not from transformers: the exported code "
                "subclasses the base architecture's transformers classes; export an adapter of a model "
                "that transformers itself implements"
            )
    return None


def _import_line(cls: type) -> str:
    """``from transformers import X`` where transformers exports ``cls`` at its top, else from its module."""
    if getattr(transformers, cls.__name__, None) is cls:
        return f"from transformers import {cls.__name__}"
    return f"from {cls.__module__} import {cls.__name__}"
