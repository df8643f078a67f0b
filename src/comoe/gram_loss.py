"""The Gram-form contrastive loss of a group of modules as one autograd node, with a hand-written backward.

``comoe.auxiliary`` batches the loss of every module call with the same token count, E and r. As plain ops
(``losses.stacked_cosines`` and ``losses.stacked_info_nce``) autograd differentiates a hundred-odd small
operators, and keeping the cosines' N × E·r intermediates for backward costs memory, so above a threshold
they are recomputed there (a second forward). Here the forward runs a leaner set of operators and keeps its
inputs (the codes and Gram matrices, which the layers keep anyway) and a few (M, N, A, E) tensors; the
backward forms the gradients of the codes and the Gram matrices directly. The same function as
``stacked_cosines`` + ``stacked_info_nce`` up to float rounding (tested, and by finite differences in
float64), for fixed-size expert sets (no anchor mask).

With codes h (M, N, E, r), G = B_catᵀ B_cat per module and anchors a:

    ‖E_j‖² = h_jᵀ G_jj h_j,   ⟨E_a, E_j⟩ = h_aᵀ G_aj h_j,   cos_aj = ⟨E_a, E_j⟩ / (‖E_a‖ ‖E_j‖)

(norms floored at ``norm_eps``), then Algorithm 1's loss from cos / τ over the positives and negatives.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from comoe.losses import ContrastiveOutput


@lru_cache(maxsize=32)
def _layout(n_exp: int, rank: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(block mask (E·r, E·r) of G's diagonal blocks in ``dtype``, each column's expert (E·r,), 0..E-1)."""
    expert = torch.arange(n_exp, device=device).repeat_interleave(rank)
    return (expert[:, None] == expert[None, :]).to(dtype), expert, torch.arange(n_exp, device=device)


def gram_group_loss(
    codes: list[Tensor],
    grams: list[Tensor],
    anchors: Tensor,
    active: Tensor,
    negatives: Tensor,
    weights: Tensor,
    temperature: float,
    epsilon: float,
    norm_eps: float,
    every_negative: bool = False,
) -> ContrastiveOutput:
    """Each module's loss (M,) and its logged mean positive and negative cosines (M,), detached.

    codes: M tensors (N, E·r); grams: M tensors (E·r, E·r); anchors (M, N, A); active and negatives
    (M, N, E) bool; weights (N,): each token's weight in the mean (``losses._token_weights``);
    every_negative: ``negatives`` are all the inactive experts (fewer masks to form)."""
    n_exp = active.shape[-1]
    loss, pos_cos, neg_cos = _GramGroupLoss.apply(
        anchors,
        active,
        negatives,
        weights,
        temperature,
        epsilon,
        norm_eps,
        n_exp,
        len(codes),
        every_negative,
        *codes,
        *grams,
    )
    return ContrastiveOutput(loss, pos_cos, neg_cos)


def _products(codes: Tensor, gram: Tensor, anchors: Tensor, n_exp: int) -> tuple[Tensor, ...]:
    """The products the cosines are read from: the block-diagonal part G_d of G, u = h G_d (‖E_j‖² =
    Σ u_j ⊙ h_j), the anchors' one-hots over the E·r columns, the anchors' codes in their blocks (M, N, A,
    E·r) and their projections p = (h_a in block a) G (⟨E_a, E_j⟩ = Σ p_j ⊙ h_j)."""
    n_mod, n_tokens, width = codes.shape
    blocks, expert, _ = _layout(n_exp, width // n_exp, codes.device, codes.dtype)
    gram_d = gram * blocks
    onehot = (expert == anchors[..., None]).to(codes.dtype)  # (M, N, A, E·r)
    masked = codes.unsqueeze(2) * onehot
    proj = torch.bmm(masked.view(n_mod, -1, width), gram).view(masked.shape)
    return gram_d, torch.bmm(codes, gram_d), onehot, masked, proj


def _cosines(codes: Tensor, gram: Tensor, anchors: Tensor, norm_eps: float, n_exp: int) -> tuple:
    """cos (M, N, A, E), the denominators ‖E_a‖ ‖E_j‖ and what backward turns the norms' gradient into
    the squared norms' (M, N, E)."""
    n_mod, n_tokens, _ = codes.shape
    _, u, _, _, proj = _products(codes, gram, anchors, n_exp)
    sq = (u * codes).view(n_mod, n_tokens, n_exp, -1).sum(-1)
    floored = sq.clamp_min(norm_eps**2)
    norms = floored.sqrt()
    dots = (proj * codes.unsqueeze(2)).view(*proj.shape[:3], n_exp, -1).sum(-1)
    den = norms.gather(2, anchors).unsqueeze(-1) * norms.unsqueeze(2)
    # d‖E_j‖/d‖E_j‖² times −1 (each norm enters its cosines as −cos/norm): zero where the floor holds
    factor = (sq >= norm_eps**2) * -0.5 / floored
    return dots / den, den, factor


class _GramGroupLoss(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        anchors,
        active,
        negatives,
        weights,
        temperature,
        epsilon,
        norm_eps,
        n_exp,
        n_mod,
        every_negative,
        *codes_and_grams,
    ):  # noqa: D102
        codes_list, grams = codes_and_grams[:n_mod], codes_and_grams[n_mod:]
        wide_dtypes = (codes_list[0].dtype, grams[0].dtype)  # >= fp32, as stacked_cosines computes
        dtype = torch.float64 if torch.float64 in wide_dtypes else torch.float32
        codes = torch.stack(codes_list).to(dtype)
        gram = torch.stack(grams).to(dtype)
        cos, den, factor = _cosines(codes, gram, anchors, norm_eps, n_exp)
        _, _, experts = _layout(n_exp, codes.shape[-1] // n_exp, codes.device, codes.dtype)
        is_anchor = experts == anchors[..., None]  # (M, N, A, E)
        positive = active.unsqueeze(2) & ~is_anchor
        # every inactive expert a negative: positives and negatives are every expert but the anchor
        outside = is_anchor if every_negative else ~(positive | negatives.unsqueeze(2))
        neg_inf = torch.finfo(dtype).min
        logits = cos / temperature
        pos_logits = logits.masked_fill(~positive, neg_inf)
        all_logits = logits.masked_fill(outside, neg_inf)
        lse_pos = pos_logits.logsumexp(-1, keepdim=True)
        lse_all = all_logits.logsumexp(-1, keepdim=True)
        if epsilon > 0:
            lse_all = torch.logaddexp(lse_all, torch.full_like(lse_all, math.log(epsilon)))
        weights = weights.to(dtype)
        loss = ((lse_all - lse_pos).mean(dim=(2, 3)) * weights).sum(-1)
        masks = torch.stack([positive, negatives.unsqueeze(2).expand_as(positive)]).to(
            dtype
        )  # (2, M, N, A, E)
        means = (cos * masks).sum((3, 4)) / masks.sum((3, 4)).clamp_min(1.0)
        pos_cos, neg_cos = (means * weights).sum(-1).unbind()
        # d(lse_all − lse_pos)/d logits: the softmax over the positives and negatives − over the positives
        soft = (all_logits - lse_all).exp() - (pos_logits - lse_pos).exp()
        # kept: the codes and Gram matrices as given (the layers keep them anyway), two (M, N, A, E) tensors
        kept = (anchors, weights, soft / den, soft * cos, factor)
        ctx.save_for_backward(*kept, *codes_and_grams)
        ctx.setup = (temperature, norm_eps, n_exp, n_mod, dtype)
        ctx.mark_non_differentiable(pos_cos, neg_cos)
        ctx.set_materialize_grads(False)
        return loss, pos_cos, neg_cos

    @staticmethod
    def backward(ctx, grad_loss, _pos, _neg):  # noqa: D102
        anchors, weights, soft_den, soft_cos, factor, *inputs = ctx.saved_tensors
        temperature, norm_eps, n_exp, n_mod, dtype = ctx.setup
        if grad_loss is None:
            return (None,) * (10 + len(inputs))
        n_anchor = anchors.shape[-1]
        g_token = torch.outer(grad_loss, weights / (n_anchor * temperature)).view(n_mod, -1, 1, 1)
        g_dots = g_token * soft_den  # cos = dots / den
        spread = g_token * soft_cos  # d cos / d norm = −cos / norm, for the anchor's and the expert's norm
        acc = spread.sum(2).scatter_add(2, anchors, spread.sum(3))
        g_sq = (acc * factor).unsqueeze(-1)
        codes = torch.stack(inputs[:n_mod]).to(dtype)
        gram = torch.stack(inputs[n_mod:]).to(dtype)
        n_tokens, width = codes.shape[1], codes.shape[2]
        gram_d, u, onehot, masked, proj = _products(codes, gram, anchors, n_exp)
        blocks = _layout(n_exp, width // n_exp, codes.device, dtype)[0]
        g_u = (g_sq * codes.view(n_mod, n_tokens, n_exp, -1)).view_as(codes)  # sq = Σ u ⊙ h, u = h G_d
        g_codes = (g_sq * u.view(n_mod, n_tokens, n_exp, -1)).view_as(codes) + torch.bmm(g_u, gram_d.mT)
        g_gram = torch.bmm(codes.mT, g_u) * blocks
        g_proj = g_dots.unsqueeze(-1) * codes.view(n_mod, n_tokens, 1, n_exp, -1)  # (M, N, A, E, r)
        g_proj = g_proj.view(n_mod, n_tokens * n_anchor, width)
        g_codes = g_codes + (g_dots.unsqueeze(-1) * proj.view(*g_dots.shape, -1)).sum(2).view_as(codes)
        g_masked = torch.bmm(g_proj, gram.mT).view(masked.shape)
        g_codes = g_codes + (g_masked * onehot).sum(2)
        g_gram = g_gram + torch.bmm(masked.view(n_mod, -1, width).mT, g_proj)
        g_codes = [g.to(t.dtype) for g, t in zip(g_codes.unbind(), inputs[:n_mod], strict=True)]
        g_grams = [g.to(t.dtype) for g, t in zip(g_gram.unbind(), inputs[n_mod:], strict=True)]
        return (None,) * 10 + (*g_codes, *g_grams)
