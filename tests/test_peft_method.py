"""CoMoE as a registered PEFT method: get_peft_model, PeftModel.from_pretrained (also in a fresh process),
PEFT's layout on disk, comoe 0.1 adapters, what PEFT's API does on a routed mixture, and stacking refused."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from safetensors.torch import load_file

from comoe import (
    AdapterLoadError,
    CoMoEConfig,
    CoMoELayer,
    CoMoEModel,
    CoMoETuner,
    RoutingRecorder,
    get_comoe_model,
)
from comoe.config import CONFIG_NAME, WEIGHTS_NAME
from tests.tiny_models import VOCAB, batch, build, randomize_adapters, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)  # the child imports ``tests.tiny_models`` from here
LEGACY = os.path.join(
    TESTS_DIR, "fixtures", "adapter-comoe-0.1"
)  # written by comoe 0.1 (before PEFT registration)
LEGACY_LOGITS = (
    LEGACY + "-logits.safetensors"
)  # that adapter's logits on batch("llama"), computed by comoe 0.1


def peft_model(task_type: str | None = None, **overrides) -> PeftModel:
    config = tiny_comoe_config("llama", task_type=task_type, **overrides)
    return get_peft_model(build("llama"), config)


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch("llama")).logits


def test_comoe_is_registered_with_peft():
    assert PeftType("COMOE") is PeftType.COMOE and PeftType.COMOE in list(PeftType)
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.COMOE] is CoMoEConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.COMOE] is CoMoETuner
    assert CoMoEConfig().peft_type is PeftType.COMOE and isinstance(CoMoEConfig(), PeftConfig)


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"], ids=["PeftModel", "PeftModelForCausalLM"])
@pytest.mark.parametrize("balance", [0.0, 0.3], ids=["contrastive", "contrastive+balance"])
def test_get_peft_model_trains_with_the_auxiliary_terms_in_the_loss(task_type, balance):
    model = peft_model(task_type, contrastive_weight=0.5, balance_weight=balance)
    assert type(model) is (PeftModelForCausalLM if task_type else PeftModel)
    assert isinstance(model.base_model, CoMoETuner)
    assert len(model.base_model.adapted_modules) == 8
    model.train()
    inputs = batch("llama", pad=0)
    out = model(**inputs, labels=inputs["input_ids"])
    task = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), inputs["input_ids"][:, 1:].reshape(-1))
    expected = task + 0.5 * out.contrastive_loss + (balance * out.balance_loss if balance else 0.0)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert ("balance_loss" in out) == bool(balance)
    out.loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad} == {
        "comoe_A",
        "comoe_B",
        "comoe_router",
    }


def test_eval_loss_and_generate_carry_no_auxiliary_term():
    model = peft_model("CAUSAL_LM").eval()
    inputs = batch("llama", pad=0)
    with torch.no_grad():
        out = model(**inputs, labels=inputs["input_ids"])
    task = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), inputs["input_ids"][:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, task)
    generated = model.generate(input_ids=inputs["input_ids"][:1], max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


RELOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import comoe  # registers the method with PEFT
    from peft import PeftModel
    from safetensors.torch import save_file
    from tests.tiny_models import batch, build

    torch.set_num_threads(1)
    for result, adapter in zip(sys.argv[1::2], sys.argv[2::2]):  # (logits file, adapter directory) pairs
        model = PeftModel.from_pretrained(build("llama", seed=0), adapter)
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        assert type(model.base_model).__name__ == "CoMoETuner"
        with torch.no_grad():
            save_file({"logits": model(**batch("llama")).logits.contiguous()}, result)
    """
)


@pytest.mark.slow
def test_peft_from_pretrained_in_a_fresh_process_reproduces_the_logits(tmp_path):
    """Saved by PEFT's ``save_pretrained`` (a ``get_peft_model`` model) and by comoe's, reloaded by a fresh
    process through ``PeftModel.from_pretrained`` (one process for both: imports dominate)."""
    expected, argv = {}, []
    for saver in ("peft-save_pretrained", "comoe-save_pretrained"):
        if saver == "peft-save_pretrained":
            model = peft_model("CAUSAL_LM")
        else:
            model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
        with torch.no_grad():
            randomize_adapters(model)
        model.eval()
        expected[saver] = logits_of(model)
        assert not torch.allclose(
            expected[saver], logits_of(build("llama")), atol=1e-3
        )  # the adapter matters
        adapter = tmp_path / saver
        model.save_pretrained(adapter)
        assert {CONFIG_NAME, WEIGHTS_NAME} <= set(os.listdir(adapter))
        assert all(k.startswith("base_model.model.model.layers.") for k in load_file(adapter / WEIGHTS_NAME))
        argv += [str(tmp_path / f"{saver}.safetensors"), str(adapter)]
    proc = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, *argv],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for saver, logits in expected.items():
        got = load_file(tmp_path / f"{saver}.safetensors")["logits"]
        torch.testing.assert_close(got, logits, rtol=0, atol=0, msg=lambda m, s=saver: f"{s}: {m}")


def test_peft_and_comoe_write_the_same_files(tmp_path):
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    with torch.no_grad():
        randomize_adapters(model)
    model.save_pretrained(tmp_path / "comoe")
    PeftModel.save_pretrained(model, str(tmp_path / "peft"))  # PEFT's own writer on the same model
    ours, theirs = load_file(tmp_path / "comoe" / WEIGHTS_NAME), load_file(tmp_path / "peft" / WEIGHTS_NAME)
    assert sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert CoMoEConfig.from_pretrained(tmp_path / "peft").method_dict() == model.comoe_config.method_dict()


@pytest.mark.parametrize("loader", ["CoMoEModel.from_pretrained", "PeftModel.from_pretrained"])
def test_adapters_saved_by_comoe_0_1_still_load_exactly(loader):
    assert all(
        not k.startswith("base_model.") for k in load_file(os.path.join(LEGACY, WEIGHTS_NAME))
    )  # old layout
    load = CoMoEModel.from_pretrained if loader.startswith("CoMoE") else PeftModel.from_pretrained
    model = load(build("llama", seed=0), LEGACY)
    # the logits 0.1 computed, to float32 rounding: the gates are now the softmax of the top-k logits (the
    # same function as 0.1's renormalised top-k of the softmax, rounded differently); any weight loaded
    # wrong or not at all moves them by orders of magnitude more
    torch.testing.assert_close(logits_of(model), load_file(LEGACY_LOGITS)["logits"], rtol=0, atol=1e-6)


def test_peft_from_pretrained_refuses_an_adapter_of_another_shape(tmp_path):
    get_comoe_model(build("llama"), tiny_comoe_config("llama", r=8)).save_pretrained(tmp_path / "r8")
    config = CoMoEConfig.from_pretrained(tmp_path / "r8")
    config.r = 4  # the config says r=4, the tensors were saved at r=8
    config.save_pretrained(tmp_path / "r8")
    with pytest.raises(
        AdapterLoadError, match=r"comoe_A has shape \(32, 32\) but this model expects \(16, 32\)"
    ):
        PeftModel.from_pretrained(build("llama"), str(tmp_path / "r8"))


def test_merging_is_refused_with_the_reason_and_unload_gives_the_base_back():
    base_logits = logits_of(build("llama"))
    model = peft_model("CAUSAL_LM")
    with torch.no_grad():
        randomize_adapters(model)
    model.eval()
    adapted = logits_of(model)
    for merge in (model.merge_and_unload, model.merge_adapter):
        with pytest.raises(ValueError, match="cannot be merged.*router selects"):
            merge()
    torch.testing.assert_close(logits_of(model), adapted, rtol=0, atol=0)  # a refused merge changed nothing
    with model.disable_adapter():
        torch.testing.assert_close(logits_of(model), base_logits, rtol=0, atol=0)
    torch.testing.assert_close(logits_of(model), adapted, rtol=0, atol=0)
    plain = model.unload()
    assert not any(isinstance(m, CoMoELayer) for m in plain.modules())
    torch.testing.assert_close(logits_of(plain), base_logits, rtol=0, atol=0)
    assert "aux_loss" not in plain.train()(
        **batch("llama"), labels=batch("llama")["input_ids"]
    )  # no hook left


def test_one_adapter_per_model(capsys):
    model = peft_model()
    model.set_adapter("default")
    with pytest.raises(ValueError, match="Adapter other not found"):  # PEFT's own check
        model.set_adapter("other")
    with pytest.raises(ValueError, match="one adapter per model.*already has the adapter 'default'"):
        model.add_adapter("second", tiny_comoe_config("llama"))
    assert list(model.peft_config) == ["default"]  # the refused adapter left nothing behind
    with pytest.raises(ValueError, match="one adapter per model.*unload"):
        model.delete_adapter("default")
    model.print_trainable_parameters()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"trainable params: {trainable:,d}" in capsys.readouterr().out
    layers = model.base_model.adapted_modules.values()
    assert (
        model.get_nb_trainable_parameters()[0]
        == trainable
        == sum(  # E·r·(d_in + d_out) + E·d_in per layer
            4 * 4 * (m.in_features + m.out_features) + 4 * m.in_features for m in layers
        )
    )


def test_comoe_model_is_a_peft_model_with_comoe_conveniences():
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    assert isinstance(model, PeftModel) and isinstance(model.base_model, CoMoETuner)
    assert model.peft_config["default"] is model.comoe_config
    model.train()
    inputs = batch("llama")
    with model.recording(RoutingRecorder(num_tasks=2)) as recorder:
        out = model(**inputs, labels=inputs["input_ids"], task_ids=torch.tensor([0, 1]))
    assert (
        set(recorder.summary()) == set(model.adapted_modules)
        and out.aux_loss is model.get_aux_loss() is model.last_aux.total
    )


def test_wrapping_a_peft_lora_model_is_refused_and_leaves_its_lora_weights_trainable():
    lora = get_peft_model(build("llama"), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    for wrap in (
        lambda m: get_comoe_model(m, tiny_comoe_config("llama")),
        lambda m: get_comoe_model(
            m.get_base_model(), tiny_comoe_config("llama", target_modules="all-linear")
        ),
    ):
        with pytest.raises(ValueError, match="already carries PEFT adapters.*merge_and_unload"):
            wrap(lora)
        assert {n for n, p in lora.named_parameters() if p.requires_grad} == trainable
        assert not any(isinstance(m, CoMoELayer) for m in lora.modules())
    # the working combination: merge the LoRA into the base, then train CoMoE on the merged model
    merged = lora.merge_and_unload()
    combined = get_comoe_model(merged, tiny_comoe_config("llama"))
    assert len(combined.adapted_modules) == 8


def test_positional_inputs_are_read_by_name_whatever_the_model_orders_them():
    """GPT-2's second forward parameter is past_key_values, Llama's attention_mask: the padding mask that
    the contrastive loss uses must be the attention mask in both."""
    from tests.tiny_models import build as build_family

    for family in ("gpt2", "llama"):
        model = get_comoe_model(build_family(family), tiny_comoe_config(family))
        model.train()
        inputs = batch(family)
        by_name = model(**inputs)
        tuner = model.base_model
        masks = []
        context = tuner.context
        tuner.model.register_forward_pre_hook(
            lambda m, a, k, masks=masks, context=context: masks.append(context.token_mask), with_kwargs=True
        )
        if family == "llama":
            model(inputs["input_ids"], inputs["attention_mask"])
        else:
            model(
                inputs["input_ids"], None, inputs["attention_mask"]
            )  # (input_ids, past_key_values, attention_mask)
        assert torch.equal(masks[0], inputs["attention_mask"].reshape(-1).bool())
        assert by_name.contrastive_loss is not None


def test_peft_status_reports_the_comoe_layers():
    """PEFT's own reports (``get_model_status``, ``get_layer_status``) read comoe's declared adapter layers."""

    model = get_comoe_model(build("llama"), tiny_comoe_config("llama"))
    status = model.get_model_status()
    assert status.peft_types == {"default": "COMOE"} and status.num_adapter_layers == 8
    assert status.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    layers = model.get_layer_status()
    assert {layer.module_type for layer in layers} == {"CoMoELayer"} and len(layers) == 8
