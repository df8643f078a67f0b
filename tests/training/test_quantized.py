"""bitsandbytes-quantised bases (nf4, int8): adapters and routers stay fp32, training lowers the loss,
the adapter reloads exactly onto a freshly quantised base, and the command line's `--quantize` runs
train → eval on the user's path."""

from __future__ import annotations

import json

import pytest
import torch

from comoe import CoMoEModel, get_comoe_model
from comoe.ffn import CoMoEFFNLayer
from comoe.training.base_models import load_base_model
from comoe.training.run_config import RunConfig
from tests.cli_runs import comoe_cli, read_log
from tests.launches import ACCELERATE_CONFIGS, check, launch, saved_adapter

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("single_thread")

QUANTISED = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama at hidden 64: bitsandbytes' CPU nf4 inference path needs in_features >= its block
    size (64); every real model has that."""
    from tests.tiny_models import save_tiny_llama_with_real_tokenizer

    directory = tmp_path_factory.mktemp("tiny-llama-64")
    save_tiny_llama_with_real_tokenizer(directory, hidden=64)
    return directory


def tiny_config(**overrides):
    from tests.tiny_models import tiny_comoe_config

    return tiny_comoe_config("llama", contrastive_weight=0.5, **overrides)


@pytest.mark.parametrize("experts", ["lora", "dora", "ffn"])
@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_training_on_a_quantised_base_lowers_the_loss_and_reloads_exactly(
    model_dir, tmp_path, quantize, experts
):
    """LoRA experts, DoRA experts (their row norms need the dequantised base weight) and whole-FFN experts
    (the frozen quantised FFN shared by all experts; its down weight dequantised for the contrastive loss)."""
    base, _ = load_base_model(str(model_dir), quantize=quantize)
    placement = "ffn" if experts == "ffn" else "linear"
    model = get_comoe_model(base, tiny_config(use_dora=experts == "dora", placement=placement))
    for layer in model.adapted_modules.values():
        linear = layer.base_layer.down_proj if isinstance(layer, CoMoEFFNLayer) else layer.base_layer
        assert isinstance(linear, QUANTISED[quantize])
        assert all(p.dtype == torch.float32 for p in layer.adapter_parameters())
    ids = torch.randint(3, 2000, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(10):
        out = model(input_ids=ids, labels=ids)
        assert out.contrastive_loss > 0
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append((out.loss - out.aux_loss).item())  # the task loss
    assert max(losses[-3:]) < losses[0] - 0.04, losses  # fp32 lowers it by ≈0.1 here: a tiny random model
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh, _ = load_base_model(str(model_dir), quantize=quantize)
    reloaded = CoMoEModel.from_pretrained(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.slow
def test_cli_quantize_trains_and_evaluates_on_the_quantised_base_and_fsdp2_trains_it_too(model_dir, tmp_path):
    """`--quantize nf4` through the command line on one process, and the same run sharded with FSDP2 over 2
    processes (the packed weights stored in the compute dtype, which FSDP shards): the same adapter. No
    randomness that depends on how examples are split over processes (all anchors, no dropout)."""
    config = tmp_path / "nf4.yaml"
    config.write_text(
        f"model: {model_dir}\ntasks: [strategyqa]\ntrain_per_task: 16\ntest_per_task: 6\nbatch_size: 4\nr: 4\n"
        "max_steps: 3\neval_base: false\nquantize: nf4\nlora_dropout: 0.0\n"
        "adapter: {anchor: all, contrastive_weight: 0.5, norm_eps: 1.0e-2}\n"  # no gradient spike (test_zero.py)
    )
    run_dir, sharded_dir = tmp_path / "nf4", tmp_path / "nf4-fsdp2"
    comoe_cli("train", "--config", str(config), "--grad-accum", "2", "--output-dir", str(run_dir))
    assert RunConfig.from_yaml(run_dir / "run_config.yaml").quantize == "nf4"
    assert all(row["contrastive"] > 0 for row in read_log(run_dir))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    comoe_cli("eval", str(run_dir))  # reloads the adapter onto a freshly quantised base
    again = json.loads((run_dir / "eval_label.json").read_text())
    for task, scores in metrics["adapter"]["tasks"].items():
        assert again["adapter"]["tasks"][task]["accuracy"] == scores["accuracy"]

    fsdp2 = ACCELERATE_CONFIGS / "fsdp2.yaml"
    check(launch(fsdp2, "train", "--config", str(config), "--output-dir", str(sharded_dir), port=29551))
    single, sharded = saved_adapter(run_dir), saved_adapter(sharded_dir)
    assert single.keys() == sharded.keys()
    for name, tensor in single.items():
        torch.testing.assert_close(
            sharded[name], tensor, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
    assert json.loads((sharded_dir / "metrics.json").read_text())["train"]["processes"] == 2


@pytest.mark.slow
def test_bad_quantize_values_and_a_missing_bitsandbytes_are_clear_errors(model_dir, tmp_path, monkeypatch):
    result = comoe_cli(
        "train",
        "--model",
        str(model_dir),
        "--quantize",
        "nf8",
        "--output-dir",
        str(tmp_path / "x"),
        check=False,
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "quantize must be one of nf4, int8, got 'nf8'" in result.stderr + result.stdout
    assert not (tmp_path / "x").exists()
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(ValueError, match=r"needs bitsandbytes.*pip install 'comoe\[quant\]'"):
        RunConfig(quantize="int8")
