"""Batching and the training loss: prompt/answer boundary, trimmed output head, deterministic epochs."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from comoe import CoMoEConfig, get_comoe_model
from comoe.data.batching import IGNORE_INDEX, collate, encode_example
from comoe.data.prompts import format_prompt
from comoe.data.schema import Example
from comoe.training.base_models import load_tokenizer
from comoe.training.loop import causal_lm_loss
from comoe.training.steps import epoch_batches


def test_answer_tokens_are_the_only_labels_and_long_prompts_lose_their_start():
    tokenizer = load_tokenizer()
    example = Example(task="t", question="word " * 300 + "Which?", choices=("yes", "no"), answer=1)
    encoded = encode_example(example, tokenizer, task_id=3, max_length=64)
    assert len(encoded.input_ids) == 64 and encoded.task_id == 3
    answer = tokenizer(" B", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded.input_ids[-len(answer) :] == answer
    assert encoded.labels == [IGNORE_INDEX] * (64 - len(answer)) + answer
    prompt_end = tokenizer(format_prompt(example))["input_ids"][-5:]
    assert encoded.input_ids[-len(answer) - 5 : -len(answer)] == prompt_end  # the end of the prompt survives


def test_trimmed_head_loss_equals_the_full_loss_and_transformers_loss():
    torch.manual_seed(0)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model = get_comoe_model(base, CoMoEConfig(r=4, lora_dropout=0.0, contrastive_weight=0.0))
    with torch.no_grad():
        for layer in model.adapted_modules.values():
            layer.experts.comoe_B.normal_()
    from comoe.data.batching import EncodedExample

    items = [
        EncodedExample(list(range(5, 5 + n)), [IGNORE_INDEX] * (n - 2) + [7, 8], t)
        for t, n in enumerate((9, 4, 6))
    ]
    batch = collate(items, pad_token_id=0)
    full, _ = causal_lm_loss(model, dict(batch), trim=False)
    trimmed, _ = causal_lm_loss(model, dict(batch), trim=True)
    reference = model(**{k: v for k, v in batch.items() if k != "task_ids"}).loss
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-6)
    torch.testing.assert_close(trimmed, reference, rtol=0, atol=1e-6)


def test_epoch_batches_are_deterministic_disjoint_and_split_across_ranks():
    lengths = [(i * 37) % 50 + 1 for i in range(103)]
    one = epoch_batches(lengths, 4, seed=1, epoch=0, rank=0, world=1)
    assert one == epoch_batches(lengths, 4, seed=1, epoch=0, rank=0, world=1)
    assert one != epoch_batches(lengths, 4, seed=1, epoch=1, rank=0, world=1)
    flat = [i for b in one for i in b]
    assert sorted(flat) == list(range(103))
    r0 = epoch_batches(lengths, 4, seed=1, epoch=0, rank=0, world=2)
    r1 = epoch_batches(lengths, 4, seed=1, epoch=0, rank=1, world=2)
    assert len(r0) == len(r1) and not {i for b in r0 for i in b} & {i for b in r1 for i in b}
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in one) / len(one)
    assert spread < 10  # length grouping: little padding inside a batch
