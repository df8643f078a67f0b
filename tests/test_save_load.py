"""save_pretrained / from_pretrained: safetensors only, exact reload in a fresh process, clean failures."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from comoe import AdapterLoadError, CoMoEConfig, CoMoELayer, CoMoEModel, get_comoe_model
from comoe.config import CONFIG_NAME, README_NAME, WEIGHTS_NAME
from tests.tiny_models import TARGETS, batch, build, randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")

FAMILIES = ["llama", "qwen2", "gpt2", "bert"]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)  # the child imports ``tests.tiny_models`` from here


def make_config(family: str, **overrides) -> CoMoEConfig:
    return tiny_comoe_config(family, **{**dict(anchor="all", num_negatives=1, temperature=0.2), **overrides})


def adapted(family: str, **overrides) -> CoMoEModel:
    model = get_comoe_model(build(family, seed=0), make_config(family, **overrides))
    randomize_adapters(model)
    return model.eval()


def logits_of(model, family: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(family)).logits


# --- reload in a fresh interpreter --------------------------------------------------------------------
RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import save_file
    from tests.tiny_models import batch, build
    from comoe import CoMoEModel

    torch.set_num_threads(1)
    out = {}
    for family, directory in zip(sys.argv[2::2], sys.argv[3::2]):
        model = CoMoEModel.from_pretrained(build(family, seed=0), directory)
        assert not model.training
        with torch.no_grad():
            out[family] = model(**batch(family)).logits.contiguous()
    save_file(out, sys.argv[1])
    """
)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """Save one adapter per family here; reload all of them in ONE fresh Python process."""
    root = tmp_path_factory.mktemp("adapters")
    expected, base_logits, dirs = {}, {}, {}
    for family in FAMILIES:
        base_logits[family] = logits_of(build(family, seed=0), family)
        model = adapted(family)
        expected[family] = logits_of(model, family)
        dirs[family] = root / family
        model.save_pretrained(dirs[family])
    result = root / "reloaded_logits.safetensors"
    args = [sys.executable, "-c", RELOAD_SCRIPT, str(result)]
    for family in FAMILIES:
        args += [family, str(dirs[family])]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=240, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return expected, base_logits, load_file(str(result)), dirs


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_process_reload_gives_identical_logits(reloaded, family):
    expected, base_logits, got, _ = reloaded
    torch.testing.assert_close(got[family], expected[family], rtol=0, atol=1e-6)
    assert not torch.allclose(expected[family], base_logits[family], atol=1e-3)  # the adapter matters


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_files_are_config_safetensors_and_readme_only(reloaded, family):
    _, _, _, dirs = reloaded
    directory = dirs[family]
    assert sorted(os.listdir(directory)) == [
        README_NAME,
        CONFIG_NAME,
        WEIGHTS_NAME,
    ]  # no pickles, no leftovers
    model = adapted(family)  # the same seeds: the same adapter as the one saved
    expected = {"base_model.model." + k: v for k, v in model.adapter_state_dict().items()}  # PEFT's layout
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as fh:
        keys = set(fh.keys())
        assert fh.metadata()["format"] == "pt"
        for key in keys:
            torch.testing.assert_close(fh.get_tensor(key), expected[key].detach(), rtol=0, atol=0)
    assert keys == set(expected)
    assert all(k.rsplit(".", 1)[-1] in {"comoe_A", "comoe_B", "comoe_router"} for k in keys)
    assert len(keys) == 3 * len(model.adapted_modules)
    # the config round-trips through adapter_config.json
    config = CoMoEConfig.from_pretrained(directory)
    assert config.inference_mode  # PEFT saves every adapter so; a loader sets it from is_trainable
    assert dataclasses.replace(config, inference_mode=False) == model.comoe_config
    assert json.loads((directory / CONFIG_NAME).read_text())["target_modules"] == TARGETS[family]


def test_in_process_reload_and_trainable_flag(tmp_path):
    model = adapted("llama")
    model.save_pretrained(tmp_path)
    frozen = CoMoEModel.from_pretrained(build("llama", seed=0), tmp_path)
    assert frozen.trainable_parameters()[0] == 0 and not frozen.training
    torch.testing.assert_close(logits_of(frozen, "llama"), logits_of(model, "llama"), rtol=0, atol=1e-6)
    trainable = CoMoEModel.from_pretrained(build("llama", seed=0), tmp_path, is_trainable=True)
    assert trainable.trainable_parameters()[0] == sum(p.numel() for p in model.adapter_state_dict().values())
    # saving again overwrites atomically and leaves no temporary file
    trainable.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [README_NAME, CONFIG_NAME, WEIGHTS_NAME]


# --- failures that change nothing ------------------------------------------------------------------
def snapshot(model: CoMoEModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def assert_unchanged(model: CoMoEModel, before: dict[str, torch.Tensor]) -> None:
    after = model.adapter_state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} was changed by a failed load"


@pytest.fixture
def saved(tmp_path):
    adapted("llama").save_pretrained(tmp_path)
    return tmp_path


def test_adapter_for_a_base_of_another_shape_names_the_tensor(saved):
    base = build("llama", seed=0, hidden=48)
    before_logits = logits_of(base, "llama")
    with pytest.raises(AdapterLoadError) as info:
        CoMoEModel.from_pretrained(base, saved)
    message = str(info.value)
    assert "model.layers.0.self_attn.q_proj.experts.comoe_A" in message
    assert "(16, 32)" in message and "(16, 48)" in message  # saved shape, expected shape
    assert "nothing was loaded" in message
    # the caller's base model is given back as it was: no adapter layers left in it, same outputs
    assert not any(isinstance(m, CoMoELayer) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    torch.testing.assert_close(logits_of(base, "llama"), before_logits, rtol=0, atol=0)
    get_comoe_model(base, make_config("llama"))  # and can be wrapped again


def test_adapter_with_missing_tensors_lists_them(saved):
    with pytest.raises(
        AdapterLoadError, match=r"missing tensors \['model\.layers\.2\.self_attn\.k_proj\.experts\.comoe_A'"
    ):
        CoMoEModel.from_pretrained(build("llama", seed=0, num_layers=3), saved)


@pytest.mark.parametrize("damage", ["truncated", "header", "garbage", "empty"])
def test_corrupt_safetensors_raise_and_load_nothing(saved, damage):
    path = saved / WEIGHTS_NAME
    data = path.read_bytes()
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header":
        data = b"\xff" * 8 + data[8:]
    elif damage == "garbage":
        data = bytes(range(256)) * 10
    else:
        data = b""
    path.write_bytes(data)
    model = adapted("llama")
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.add_(0.5)  # differs from the saved values, so a partial load would show
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match="not a readable safetensors file"):
        model.load_adapter_weights(saved)
    assert_unchanged(model, before)
    # from_pretrained reports the same error
    with pytest.raises(AdapterLoadError):
        CoMoEModel.from_pretrained(build("llama", seed=0), saved)


def test_one_bad_tensor_among_good_ones_loads_nothing(saved):
    """Every check runs before any copy: a wrong shape in the LAST tensor leaves the first ones untouched."""
    path = saved / WEIGHTS_NAME
    tensors = load_file(str(path))
    model = adapted("llama")
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.mul_(-1.0)
    before = snapshot(model)
    last = list(model.adapter_state_dict())[-1]
    tensors[last] = torch.zeros(3, 3)
    save_file(tensors, str(path))
    with pytest.raises(AdapterLoadError, match=last.replace(".", r"\.")):
        model.load_adapter_weights(saved)
    assert_unchanged(model, before)
    # an unexpected extra tensor is refused as well
    tensors = load_file(str(path))
    tensors[last] = before[last]
    tensors["model.layers.9.mlp.up_proj.experts.comoe_A"] = torch.zeros(1)
    save_file(tensors, str(path))
    with pytest.raises(AdapterLoadError, match="unexpected tensors"):
        model.load_adapter_weights(saved)
    assert_unchanged(model, before)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        CoMoEModel.from_pretrained(build("llama"), tmp_path)
    make_config("llama").save_pretrained(tmp_path)
    base = build("llama")
    with pytest.raises(FileNotFoundError, match=WEIGHTS_NAME):
        CoMoEModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, CoMoELayer) for m in base.modules())
