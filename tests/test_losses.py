"""The Gram-form contrastive loss against Algorithm 1 written out per token; the balance loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from comoe.losses import (
    contrastive_loss,
    contrastive_loss_materialized,
    draw_anchors,
    draw_negatives,
    load_balancing_loss,
)
from comoe.routers import Routing
from tests.references import reference_contrastive

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = {"rtol": 1e-5, "atol": 1e-5}


def problem(n_tokens=12, n_exp=5, rank=3, d_in=10, d_out=16, top_k=2, dtype=torch.float32, seed=0):
    """Random inputs x, stacked experts A (E·r, d_in) and B (d_out, E·r) (B non-zero), and a top-k choice."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d_in, generator=gen, dtype=dtype)
    A = (torch.randn(n_exp * rank, d_in, generator=gen, dtype=dtype) / math.sqrt(d_in)).requires_grad_()
    B = (torch.randn(d_out, n_exp * rank, generator=gen, dtype=dtype) / math.sqrt(rank)).requires_grad_()
    scores = torch.randn(n_tokens, n_exp, generator=gen)
    topk_idx = scores.topk(top_k, dim=1).indices
    return x, A, B, topk_idx


def codes_of(x, A, n_exp, rank):
    return (x @ A.t()).view(x.shape[0], n_exp, rank)  # h_i = A_i x, (N, E, r)


def outputs_of(codes, B, n_exp, rank):
    """E_i(x) = B_i h_i, built one expert at a time (the slow, materialised way)."""
    return torch.stack([codes[:, i] @ B[:, i * rank : (i + 1) * rank].t() for i in range(n_exp)], dim=1)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors, retain_graph=True)


@pytest.mark.parametrize("anchor", ["random", "all"])
@pytest.mark.parametrize(
    ("n_exp", "top_k", "num_negatives"), [(5, 2, None), (5, 3, None), (8, 2, 3), (4, 2, 1)]
)
@pytest.mark.parametrize("padded", [False, True])
def test_gram_loss_equals_algorithm_1(anchor, n_exp, top_k, num_negatives, padded):
    rank, tau, eps = 3, 0.1, 1e-3
    x, A, B, topk_idx = problem(n_exp=n_exp, rank=rank, top_k=top_k)
    gen = torch.Generator().manual_seed(5)
    anchors = draw_anchors(topk_idx, anchor, generator=gen)
    assert anchors.shape == (x.shape[0], 1 if anchor == "random" else top_k)
    negatives = draw_negatives(topk_idx, n_exp, num_negatives, generator=gen)
    assert (negatives.sum(1) == (num_negatives or n_exp - top_k)).all()
    token_mask = None
    if padded:
        token_mask = torch.ones(x.shape[0], dtype=torch.bool)
        token_mask[[1, 4, 5]] = False

    codes = codes_of(x, A, n_exp, rank)
    out = contrastive_loss(
        codes,
        B,
        topk_idx,
        temperature=tau,
        epsilon=eps,
        anchors=anchors,
        negatives=negatives,
        token_mask=token_mask,
    )
    ref = reference_contrastive(
        outputs_of(codes, B, n_exp, rank),
        topk_idx,
        anchors,
        negatives,
        temperature=tau,
        epsilon=eps,
        token_mask=token_mask,
    )
    torch.testing.assert_close(out.loss, ref, **TOL)
    for got, want in zip(grads(out.loss, A, B), grads(ref, A, B), strict=True):
        torch.testing.assert_close(got, want, **TOL)
        assert want.abs().sum() > 0

    # the materialised form (the paper's way, kept for non-LoRA experts) is the same loss
    mat = contrastive_loss_materialized(
        outputs_of(codes, B, n_exp, rank),
        topk_idx,
        temperature=tau,
        epsilon=eps,
        anchors=anchors,
        negatives=negatives,
        token_mask=token_mask,
    )
    torch.testing.assert_close(mat.loss, ref, **TOL)
    for got, want in zip(grads(mat.loss, A, B), grads(ref, A, B), strict=True):
        torch.testing.assert_close(got, want, **TOL)


def test_gram_loss_float64_is_exact_and_gradients_reach_inactive_experts():
    n_exp, rank = 6, 4
    x, A, B, topk_idx = problem(n_exp=n_exp, rank=rank, dtype=torch.float64)
    anchors = draw_anchors(topk_idx, "all")
    negatives = draw_negatives(topk_idx, n_exp, None)
    codes = codes_of(x, A, n_exp, rank)
    out = contrastive_loss(
        codes, B, topk_idx, temperature=0.07, epsilon=1e-3, anchors=anchors, negatives=negatives
    )
    assert out.loss.dtype == torch.float64
    ref = reference_contrastive(
        outputs_of(codes, B, n_exp, rank), topk_idx, anchors, negatives, temperature=0.07, epsilon=1e-3
    )
    torch.testing.assert_close(out.loss, ref, rtol=1e-12, atol=1e-12)
    g_codes, g_B = grads(out.loss, codes, B)
    r_codes, r_B = grads(ref, codes, B)
    torch.testing.assert_close(g_codes, r_codes, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_B, r_B, rtol=1e-10, atol=1e-12)
    # nothing is detached: the inactive experts (the negatives) get gradient too
    inactive = negatives[..., None].expand_as(g_codes)
    assert g_codes[inactive].abs().sum() > 0


def test_padding_does_not_change_the_loss_and_gets_no_gradient():
    n_exp, rank = 5, 3
    x, A, B, topk_idx = problem(n_exp=n_exp, rank=rank)
    anchors, negatives = draw_anchors(topk_idx, "all"), draw_negatives(topk_idx, n_exp, None)
    mask = torch.ones(x.shape[0], dtype=torch.bool)
    mask[-4:] = False
    kw = dict(temperature=0.1, epsilon=1e-3, anchors=anchors, negatives=negatives, token_mask=mask)
    codes = codes_of(x, A, n_exp, rank).detach().requires_grad_()
    out = contrastive_loss(codes, B, topk_idx, **kw)
    changed = codes.detach().clone()
    changed[-4:] = 100 * torch.randn_like(changed[-4:])
    out2 = contrastive_loss(changed, B, topk_idx, **kw)
    torch.testing.assert_close(out.loss, out2.loss, rtol=1e-6, atol=1e-6)
    (g,) = grads(out.loss, codes)
    assert g[-4:].abs().sum() == 0 and g[:-4].abs().sum() > 0
    # the same as computing on the real tokens alone
    kept = contrastive_loss(
        codes[:-4],
        B,
        topk_idx[:-4],
        temperature=0.1,
        epsilon=1e-3,
        anchors=anchors[:-4],
        negatives=negatives[:-4],
    )
    torch.testing.assert_close(out.loss, kept.loss, **TOL)


def test_epsilon_zero_is_plain_infonce_and_similarity_summaries():
    """ε = 0: L = −log softmax mass of the positives; pos_cos/neg_cos are the mean cosines."""
    n_exp, rank = 4, 2
    x, A, B, topk_idx = problem(n_tokens=6, n_exp=n_exp, rank=rank)
    anchors, negatives = draw_anchors(topk_idx, "random"), draw_negatives(topk_idx, n_exp, None)
    codes = codes_of(x, A, n_exp, rank)
    out = contrastive_loss(
        codes, B, topk_idx, temperature=0.5, epsilon=0.0, anchors=anchors, negatives=negatives
    )
    outputs = torch.nn.functional.normalize(outputs_of(codes, B, n_exp, rank), dim=-1)
    pos_cos, neg_cos, losses = [], [], []
    for n in range(6):
        a = int(anchors[n, 0])
        p = [j for j in topk_idx[n].tolist() if j != a][0]
        cos = outputs[n] @ outputs[n, a]
        negs = negatives[n].nonzero().squeeze(1)
        pos_cos.append(cos[p])
        neg_cos.append(cos[negs].mean())
        logits = torch.cat([cos[p].view(1), cos[negs]]) / 0.5
        losses.append(-logits.log_softmax(0)[0])
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), **TOL)
    torch.testing.assert_close(out.pos_cos, torch.stack(pos_cos).mean(), **TOL)
    torch.testing.assert_close(out.neg_cos, torch.stack(neg_cos).mean(), **TOL)
    assert not out.pos_cos.requires_grad


def test_fresh_init_b_zero_is_finite():
    """B = 0 at init makes every expert output zero: the loss and its gradients must stay finite."""
    n_exp, rank = 4, 4
    x, A, _, topk_idx = problem(n_exp=n_exp, rank=rank)
    B = torch.zeros(16, n_exp * rank, requires_grad=True)
    anchors, negatives = draw_anchors(topk_idx, "random"), draw_negatives(topk_idx, n_exp, None)
    for form in ("gram", "materialized"):
        codes = codes_of(x, A, n_exp, rank)
        kw = dict(temperature=0.1, epsilon=1e-3, anchors=anchors, negatives=negatives)
        if form == "gram":
            out = contrastive_loss(codes, B, topk_idx, **kw)
        else:
            out = contrastive_loss_materialized(outputs_of(codes, B, n_exp, rank), topk_idx, **kw)
        g_A, g_B = grads(out.loss, A, B)
        assert torch.isfinite(out.loss)
        assert torch.isfinite(g_A).all() and torch.isfinite(g_B).all()
        # all cosines are 0: one positive, two negatives → −log(e^0 / (3 e^0 + ε))
        torch.testing.assert_close(out.loss, torch.tensor(math.log(3 + 1e-3)), **TOL)
    # tiny but non-zero B (the first steps): still finite
    B_small = (1e-9 * torch.randn(16, n_exp * rank)).requires_grad_()
    out = contrastive_loss(
        codes_of(x, A, n_exp, rank),
        B_small,
        topk_idx,
        temperature=0.1,
        epsilon=1e-3,
        anchors=anchors,
        negatives=negatives,
    )
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads(out.loss, A, B_small))


def test_draw_negatives_samples_only_inactive_experts():
    topk_idx = torch.tensor([[0, 1], [2, 5], [3, 4]])
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        neg = draw_negatives(topk_idx, 6, 2, generator=gen)
        assert (neg.sum(1) == 2).all()
        assert not neg.gather(1, topk_idx).any()
    all_neg = draw_negatives(topk_idx, 6, None)
    assert all_neg.sum().item() == 3 * 4 and not all_neg.gather(1, topk_idx).any()
    anchors = draw_anchors(topk_idx, "random", generator=gen)
    assert all(int(anchors[n, 0]) in topk_idx[n].tolist() for n in range(3))
    with pytest.raises(ValueError, match="'random' or 'all'"):
        draw_anchors(topk_idx, "first")


# --- the balance loss ------------------------------------------------------------------------------
def balance(probs, topk_idx, mask=None):
    """The balance loss of a top-k routing, from its ids and from the routing's share (1/k on each of a
    token's k experts): the same."""
    loss = load_balancing_loss(probs, topk_idx, mask)
    torch.testing.assert_close(
        loss, load_balancing_loss(probs, token_mask=mask, share=Routing(probs, probs, topk_idx).share())
    )
    return loss


def test_balance_loss_is_one_for_uniform_routing():
    probs = torch.full((10, 4), 0.25)
    topk_idx = torch.tensor([[0, 1], [2, 3]] * 5)
    torch.testing.assert_close(balance(probs, topk_idx), torch.tensor(1.0))
    # whatever experts are picked, uniform probabilities give 1 (Σ_e f_e = 1)
    torch.testing.assert_close(balance(probs, torch.tensor([[0, 1]] * 10)), torch.tensor(1.0))
    torch.testing.assert_close(balance(probs, None), torch.tensor(1.0))  # soft routing: every expert


def test_balance_loss_hand_computed_and_padding_masked():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.1, 0.9]])
    topk_idx = torch.tensor([[0], [0], [1]])
    # all three tokens: f = (2/3, 1/3), P = (1.4/3, 1.6/3) → 2 · (2.8 + 1.6) / 9
    torch.testing.assert_close(balance(probs, topk_idx), torch.tensor(2 * 4.4 / 9))
    # third token is padding: f = (1, 0), P = (0.65, 0.35) → 2 · 0.65 = 1.3
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(balance(probs, topk_idx, mask), torch.tensor(1.3))
    # top-2 of 3 experts: f_e = share of the 2 assignments
    probs3 = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    top2 = torch.tensor([[0, 1], [2, 0]])
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    P = probs3.mean(0)
    torch.testing.assert_close(balance(probs3, top2), 3 * (f * P).sum())
    # gradient flows into the probabilities only
    p = probs3.clone().requires_grad_()
    balance(p, top2).backward()
    torch.testing.assert_close(p.grad, 3 * f.expand(2, 3) / 2)


# --- several modules in one call ----------------------------------------------------------------------
@pytest.mark.parametrize("form", ["gram", "anchor"])
@pytest.mark.parametrize("anchor", ["random", "all"])
def test_stacked_loss_of_several_modules_equals_each_modules_loss_and_gradients(form, anchor):
    """M modules in one ``stacked_contrastive_loss`` call (either exact form) = M per-module calls with the
    same anchors and negatives: loss, cosine means, and the gradients of every module's A and B."""
    from comoe.losses import stacked_contrastive_loss

    n_exp, rank, n_tokens = 5, 3, 12
    modules = [problem(n_tokens=n_tokens, n_exp=n_exp, rank=rank, seed=seed) for seed in range(3)]
    token_mask = torch.ones(n_tokens, dtype=torch.bool)
    token_mask[-3:] = False
    kwargs = dict(temperature=0.1, epsilon=1e-3, token_mask=token_mask, norm_eps=1e-6)
    draws = [(draw_anchors(t, anchor), draw_negatives(t, n_exp, 2)) for *_, t in modules]
    singles = [
        contrastive_loss(codes_of(x, A, n_exp, rank), B, t, anchors=a, negatives=neg, **kwargs)
        for (x, A, B, t), (a, neg) in zip(modules, draws, strict=True)
    ]
    stacked = stacked_contrastive_loss(
        torch.stack([codes_of(x, A, n_exp, rank) for x, A, _, _ in modules]),
        torch.stack([B for _, _, B, _ in modules]),
        torch.stack([t for *_, t in modules]),
        anchors=torch.stack([a for a, _ in draws]),
        negatives=torch.stack([neg for _, neg in draws]),
        form=form,
        **kwargs,
    )
    for field in ("loss", "pos_cos", "neg_cos"):
        torch.testing.assert_close(getattr(stacked, field), torch.stack([getattr(o, field) for o in singles]))
    params = [t for x, A, B, _ in modules for t in (A, B)]
    for mine, theirs in zip(
        grads(stacked.loss.sum(), *params), grads(sum(o.loss for o in singles), *params), strict=True
    ):
        torch.testing.assert_close(mine, theirs, **TOL)


def test_the_cheaper_cosine_form_is_chosen_by_the_shapes():
    from comoe.losses import cheaper_cosine_form

    # many tokens against a small E·r: the Gram matrix pays off; a handful of tokens: the anchor outputs
    assert cheaper_cosine_form(n_tokens=1024, n_anchors=1, d_out=576, n_exp=4, rank=16) == "gram"
    assert cheaper_cosine_form(n_tokens=8, n_anchors=1, d_out=1024, n_exp=16, rank=16) == "anchor"


def test_stacked_loss_takes_modules_of_different_output_widths_through_their_gram_matrices():
    from comoe.losses import stacked_contrastive_loss

    n_exp, rank = 4, 3
    modules = [problem(n_exp=n_exp, rank=rank, d_out=d_out, seed=d_out) for d_out in (16, 7, 16)]
    kwargs = dict(temperature=0.1, epsilon=1e-3, norm_eps=1e-6)
    draws = [(draw_anchors(t, "random"), draw_negatives(t, n_exp, None)) for *_, t in modules]
    singles = [
        contrastive_loss(codes_of(x, A, n_exp, rank), B, t, anchors=a, negatives=neg, **kwargs).loss
        for (x, A, B, t), (a, neg) in zip(modules, draws, strict=True)
    ]
    stacked = stacked_contrastive_loss(
        torch.stack([codes_of(x, A, n_exp, rank) for x, A, _, _ in modules]),
        [B for _, _, B, _ in modules],
        torch.stack([t for *_, t in modules]),
        anchors=torch.stack([a for a, _ in draws]),
        negatives=torch.stack([neg for _, neg in draws]),
        **kwargs,
    )
    torch.testing.assert_close(stacked.loss, torch.stack(singles), **TOL)
    params = [B for _, _, B, _ in modules]
    for mine, theirs in zip(grads(stacked.loss.sum(), *params), grads(sum(singles), *params), strict=True):
        torch.testing.assert_close(mine, theirs, **TOL)
