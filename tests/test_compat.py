"""What comoe 0.1 wrote still works: adapters of every kind (``tests/compat_fixtures.py`` wrote them with
that version's code) load through both entry points and give the logits they gave then; a training
checkpoint (``tests/checkpoint_fixture.py``) resumes to the adapter 0.1 reached; old names still import."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from comoe import CoMoEModel
from comoe.compat import legacy_adapter_name
from comoe.training.checkpoint import load_checkpoint
from tests.checkpoint_fixture import AFTER, CHECKPOINT, model_and_optimizer, train_step
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


def test_a_checkpoint_comoe_0_1_wrote_resumes_to_the_adapter_it_reached(single_thread):
    """DoRA experts: 0.1 kept the tensors on the layer (``q_proj.comoe_A``) and registered the router before
    the magnitudes, so its optimizer state is matched by name, not position (q_proj's router and magnitudes
    have the same shape: a positional load would run, wrongly)."""
    model, optimizer = model_and_optimizer()
    progress = load_checkpoint(CHECKPOINT, model, optimizer, None)
    assert progress["step"] == 2
    for step in range(2, 4):
        train_step(model, optimizer, step)
    expected = load_file(str(AFTER))
    actual = {legacy_adapter_name(name): p.detach() for name, p in model.adapter_state_dict().items()}
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
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


def test_layer_tensors_read_by_their_0_1_names_with_a_warning():
    from comoe import get_comoe_model
    from tests.tiny_models import tiny_comoe_config

    model = get_comoe_model(build("llama"), tiny_comoe_config("llama", use_dora=True))
    layer = next(iter(model.routed_modules.values()))
    for name, holder in [("comoe_A", "experts"), ("comoe_magnitude", "experts"), ("comoe_router", "router")]:
        with pytest.warns(FutureWarning, match=rf"read layer\.{holder}\.{name}"):
            assert getattr(layer, name) is getattr(getattr(layer, holder), name)
    ffn = get_comoe_model(
        build("llama"), tiny_comoe_config("llama", placement="ffn", target_modules="all-linear")
    )
    block = next(iter(ffn.routed_modules.values()))
    with pytest.warns(FutureWarning, match=r"layer\.experts\.comoe_down_B"):
        assert block.comoe_down_B is block.experts.comoe_down_B
