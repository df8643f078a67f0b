"""Tiny random models of four transformers families, built from configs (no downloads).

Also imported by the fresh-process reload check, so rebuilding a base from the same family and seed
gives bit-identical weights in another interpreter.
"""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from comoe.compat import legacy_adapter_name

VOCAB = 97
HIDDEN = 32


def _decoder(config_cls, model_cls, num_layers: int, hidden: int, **extra) -> torch.nn.Module:
    """A tiny decoder of a gated-MLP family (Llama, Qwen2, Mistral, Gemma, Phi-3): 4 heads, 2 KV heads."""
    cfg = config_cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.0,
        attn_implementation="eager",
        pad_token_id=0,
        **extra,
    )
    return model_cls(cfg)


def _llama(num_layers: int, hidden: int) -> torch.nn.Module:
    return _decoder(LlamaConfig, LlamaForCausalLM, num_layers, hidden, tie_word_embeddings=False)


def _qwen2(num_layers: int, hidden: int) -> torch.nn.Module:
    return _decoder(Qwen2Config, Qwen2ForCausalLM, num_layers, hidden, tie_word_embeddings=True)


def _mistral(num_layers: int, hidden: int) -> torch.nn.Module:
    return _decoder(MistralConfig, MistralForCausalLM, num_layers, hidden)


def _gemma(num_layers: int, hidden: int) -> torch.nn.Module:  # GELU-tanh MLP, its own MLP class
    return _decoder(GemmaConfig, GemmaForCausalLM, num_layers, hidden, head_dim=hidden // 4)


def _phi3(num_layers: int, hidden: int) -> torch.nn.Module:  # gate and up fused in one gate_up_proj
    return _decoder(Phi3Config, Phi3ForCausalLM, num_layers, hidden)


def _gpt2(num_layers: int, hidden: int) -> torch.nn.Module:
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=4,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="eager",
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return GPT2LMHeadModel(cfg)


def _bert(num_layers: int, hidden: int) -> torch.nn.Module:
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        attn_implementation="eager",
        pad_token_id=0,
    )
    return BertForSequenceClassification(cfg)


BUILDERS = {
    "llama": _llama,
    "qwen2": _qwen2,
    "gpt2": _gpt2,
    "bert": _bert,
    "mistral": _mistral,
    "gemma": _gemma,
    "phi3": _phi3,
}
# What each family's adapter targets (GPT-2: transformers Conv1D; BERT: its four linear names).
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "v_proj", "gate_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "key", "value", "dense"],
}
CAUSAL = {"llama", "qwen2", "gpt2"}


def build(family: str, seed: int = 0, num_layers: int = 2, hidden: int = HIDDEN) -> torch.nn.Module:
    """The tiny base model of ``family``, with weights fixed by ``seed`` (fp32, CPU, eval mode)."""
    torch.manual_seed(seed)
    return BUILDERS[family](num_layers, hidden).eval()


def batch(family: str, seed: int = 1, batch_size: int = 2, seq_len: int = 7, pad: int = 2) -> dict:
    """input_ids and attention_mask, the last ``pad`` positions of the first row being padding."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=gen)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if pad:
        attention_mask[0, -pad:] = 0
        input_ids[0, -pad:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def is_adapter(name: str) -> bool:
    """Whether a parameter name is a comoe adapter tensor (its last component starts with ``comoe_``)."""
    return name.rsplit(".", 1)[-1].startswith("comoe_")


@torch.no_grad()
def randomize_adapters(model: torch.nn.Module, seed: int = 123, std: float = 0.1) -> None:
    """Give every expert a non-zero B (B is zero at init) and a router that routes decisively."""
    gen = torch.Generator().manual_seed(seed)
    # in the order of comoe 0.1's names, so that the draws are the ones tests/core_reference.py made
    for _, name, param in sorted((legacy_adapter_name(n), n, p) for n, p in model.named_parameters()):
        if is_adapter(name) and name.endswith("_B"):  # comoe_B, and comoe_{gate,up,down}_B of FFN experts
            param.copy_(torch.randn(param.shape, generator=gen) * std)
        elif name.endswith("comoe_router"):
            param.copy_(torch.randn(param.shape, generator=gen))


def save_tiny_llama_with_real_tokenizer(directory, hidden: int = 32) -> None:
    """A 2-layer random Llama saved with SmolLM2's tokenizer: loadable by path like any HF model, so the
    command line (`--model DIR`) runs end to end on it in seconds."""
    from comoe.training.base_models import load_tokenizer

    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def tiny_comoe_config(family: str, **overrides):
    """A small CoMoE config for ``family``'s target modules; ``overrides`` replace any field."""
    from comoe import CoMoEConfig

    kwargs = dict(
        r=4,
        lora_alpha=8,
        num_experts=4,
        top_k=2,
        target_modules=TARGETS[family],
        lora_dropout=0.0,
        contrastive_weight=0.1,
    )
    return CoMoEConfig(**{**kwargs, **overrides})


def contrastive_of_call(layer, routing, inputs):
    """The contrastive loss ``comoe.auxiliary`` forms from one call of ``layer`` (its routing and the
    contrastive inputs its forward formed), without a token mask."""
    from comoe.auxiliary import contrastive_of
    from comoe.trace import LayerTrace

    trace = LayerTrace(layer.module_name, layer.config, routing, inputs, None, True, True)
    return contrastive_of(trace, None)
