"""Adapters comoe 0.1 saved, one of every kind (``tests/compat_fixtures.py`` wrote them with that version's
code), load through both entry points and give the logits they gave then."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from comoe import CoMoEModel
from tests.compat_fixtures import FIXTURES, KINDS, inputs
from tests.tiny_models import build


@pytest.mark.parametrize("loader", ["comoe", "peft"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_an_adapter_comoe_0_1_saved_loads_with_its_logits(kind, loader):
    directory = FIXTURES / kind
    load = CoMoEModel.from_pretrained if loader == "comoe" else PeftModel.from_pretrained
    model = load(build("llama"), directory).eval()
    with torch.no_grad():
        logits = model(**inputs()).logits
    torch.testing.assert_close(
        logits, load_file(str(directory / "logits.safetensors"))["logits"], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("module", "name", "home"),
    [
        ("comoe.layer", "MERGE_REFUSED", "comoe.mixture"),
        ("comoe.layer", "grouped_matmul", "comoe.grouped"),
        ("comoe.layer", "ADAPTABLE_TYPES", "comoe.frozen"),
        ("comoe.tuner", "check_adapter_tensors", "comoe.loading"),
        ("comoe.tuner", "check_finite", "comoe.loading"),
        ("comoe.tuner", "PEFT_PREFIX", "comoe.loading"),
    ],
)
def test_names_that_left_a_module_still_import_with_a_warning(module, name, home):
    import importlib

    with pytest.warns(FutureWarning, match=f"{module}.{name} is deprecated.*{home}.{name}"):
        value = getattr(importlib.import_module(module), name)
    assert value is getattr(importlib.import_module(home), name)
