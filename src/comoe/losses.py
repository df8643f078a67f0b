"""Auxiliary losses as pure functions on tensors: CoMoE's contrastive loss and the balance loss.

The contrastive loss (paper, Algorithm 1) compares the outputs E_i(x) = B_i A_i x of the experts of one
token: an anchor among the activated experts is pulled towards the other activated experts and pushed
away from the inactive ones. For LoRA experts every inner product it needs follows from the rank-r codes
h_i = A_i x and the Gram matrix G = B_catᵀ B_cat (``gram_cosines``), so the N×E×D tensor of expert
outputs is never built. ``materialized_cosines`` is the paper's way, kept for non-LoRA experts and as a
reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class ContrastiveOutput(NamedTuple):
    loss: Tensor  # scalar: mean over (unmasked) tokens
    pos_cos: Tensor  # scalar, detached: mean cosine anchor–positive
    neg_cos: Tensor  # scalar, detached: mean cosine anchor–negative


def draw_anchors(
    topk_idx: Tensor, mode: str, slot_mask: Tensor | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """Anchor expert ids (N, A): one random activated expert per token, or all k of them.

    ``slot_mask`` (N, k) bool: which slots of ``topk_idx`` hold a selected expert, for routings whose sets
    vary in size (their first slot always does); a random anchor is then drawn among those slots."""
    n_tokens, k = topk_idx.shape
    if mode == "all":
        return topk_idx
    if mode != "random":
        raise ValueError(f"anchor must be 'random' or 'all', got {mode!r}")
    if slot_mask is None:
        pos = torch.randint(0, k, (n_tokens, 1), device=topk_idx.device, generator=generator)
    else:
        n_valid = slot_mask.sum(-1, keepdim=True)
        uniform = torch.rand(n_tokens, 1, device=topk_idx.device, generator=generator)
        pos = (uniform * n_valid).long().clamp_max(n_valid - 1)
    return topk_idx.gather(1, pos)


def anchor_mask(anchors: Tensor, mode: str, slot_mask: Tensor | None) -> Tensor | None:
    """(N, A) bool: which anchors are selected experts; None where every one is (fixed-size sets)."""
    if slot_mask is None:
        return None
    return slot_mask if mode == "all" else torch.ones_like(anchors, dtype=torch.bool)


def active_mask(topk_idx: Tensor, num_experts: int, slot_mask: Tensor | None = None) -> Tensor:
    """(N, E) bool: true for each token's activated experts (the slots ``slot_mask`` keeps, if given)."""
    mask = torch.zeros(topk_idx.shape[0], num_experts, dtype=torch.bool, device=topk_idx.device)
    return mask.scatter_(1, topk_idx, True if slot_mask is None else slot_mask)


def draw_negatives(
    topk_idx: Tensor, num_experts: int, num_negatives: int | None, generator: torch.Generator | None = None
) -> Tensor:
    """(N, E) bool negatives: every inactive expert, or ``num_negatives`` of them sampled per token."""
    return negatives_among(~active_mask(topk_idx, num_experts), num_negatives, generator)


def negatives_among(
    inactive: Tensor, num_negatives: int | None, generator: torch.Generator | None = None
) -> Tensor:
    """(N, E) bool negatives from the inactive experts (N, E): all of them, or ``num_negatives`` sampled."""
    if num_negatives is None:
        return inactive
    scores = torch.rand(inactive.shape, device=inactive.device, generator=generator)
    scores = scores.masked_fill(~inactive, -1.0)
    chosen = scores.topk(num_negatives, dim=1).indices
    return torch.zeros_like(inactive).scatter_(1, chosen, True)


def gram_cosines(codes: Tensor, lora_B: Tensor, anchors: Tensor, norm_eps: float = 1e-6) -> Tensor:
    """cos(E_a(x), E_j(x)) for each anchor a and every expert j, from codes alone.

    codes: (N, E, r) with h_i = A_i x; lora_B: (D, E*r), the experts' B stacked by columns;
    anchors: (N, A) expert ids. Returns (N, A, E). One module of ``stacked_cosines``.
    """
    return stacked_cosines(codes[None], lora_B[None], anchors[None], norm_eps)[0]


def stacked_cosines(
    codes: Tensor,
    lora_B: Tensor | Sequence[Tensor] | None,
    anchors: Tensor,
    norm_eps: float = 1e-6,
    form: str = "auto",
    gram: Tensor | None = None,
) -> Tensor:
    """``gram_cosines`` for M modules in one call: codes (M, N, E, r), anchors (M, N, A) -> (M, N, A, E);
    lora_B (M, D, E*r), or a list of M (D_m, E*r) matrices whose D_m may differ.

    Two exact forms: "gram" builds G = B_catᵀ B_cat once per module (D·(E·r)² multiply-adds) and then
    costs O((E·r)²) per token and anchor, independent of D, so modules of any D share the rest of the
    computation; "anchor" materialises only each anchor's output B_a h_a and projects it on B_cat
    (O(D·E·r) per token and anchor; modules of one D). "auto" takes the cheaper for these shapes: the
    Gram matrix pays off once there are more tokens than about E·r. ``gram`` (M, E*r, E*r): the Gram
    matrices already computed (``gram_matrices``); then ``lora_B`` is not needed.
    """
    n_mod, n_tokens, n_exp, rank = codes.shape
    if gram is not None:
        dtype = torch.promote_types(torch.promote_types(codes.dtype, gram.dtype), torch.float32)
        return _gram_form(codes.to(dtype), gram.to(dtype), anchors, norm_eps)
    if not isinstance(lora_B, Tensor):
        if len({tuple(b.shape) for b in lora_B}) > 1:
            form = "gram"  # the only form in which modules of different D meet
        else:
            lora_B = torch.stack(list(lora_B))
    dtype = torch.promote_types(torch.promote_types(codes.dtype, _dtype_of(lora_B)), torch.float32)  # >= fp32
    codes = codes.to(dtype)
    if form == "auto":
        form = cheaper_cosine_form(n_tokens, anchors.shape[-1], lora_B.shape[1], n_exp, rank)
    if form == "gram":
        return _gram_form(codes, gram_matrices(lora_B, dtype), anchors, norm_eps)
    if form != "anchor":
        raise ValueError(f"form must be 'auto', 'gram' or 'anchor', got {form!r}")
    lora_B = lora_B.to(dtype)
    b = lora_B.view(n_mod, -1, n_exp, rank)
    blocks = torch.einsum("mder,mdes->mers", b, b)  # (M, E, r, r): B_jᵀ B_j only
    outputs = [(codes * onehot).flatten(2) @ lora_B.transpose(1, 2) for onehot in _onehots(codes, anchors)]
    projected = [(out @ lora_B).view_as(codes) for out in outputs]  # B_a h_a projected on every B_j
    return _cosines(codes, blocks, projected, anchors, norm_eps)


def gram_matrices(lora_B: Tensor | Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """G = B_catᵀ B_cat per module, (M, E*r, E*r), from lora_B (M, D, E*r) or a list of (D_m, E*r)."""
    dtype = dtype or torch.promote_types(_dtype_of(lora_B), torch.float32)
    if isinstance(lora_B, Tensor):
        lora_B = lora_B.to(dtype)
        return lora_B.transpose(1, 2) @ lora_B  # G_ij = B_iᵀ B_j
    lora_B = [b.to(dtype) for b in lora_B]
    if len({b.shape for b in lora_B}) == 1:
        return _StackedGram.apply(*lora_B)
    return torch.stack([b.t() @ b for b in lora_B])


class _StackedGram(torch.autograd.Function):
    """Bᵀ B of M same-shape matrices in one batched product, keeping for backward the matrices themselves
    (parameters, usually) rather than the stacked copy that a plain ``torch.stack`` + bmm would keep."""

    @staticmethod
    def forward(ctx, *lora_B):  # noqa: D102
        ctx.save_for_backward(*lora_B)
        stacked = torch.stack(lora_B)
        return stacked.transpose(1, 2) @ stacked

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        stacked = torch.stack(ctx.saved_tensors)
        with torch.autocast(stacked.device.type, enabled=False):
            grads = stacked @ (grad + grad.transpose(1, 2)).to(stacked.dtype)  # d(BᵀB) = B (Ḡ + Ḡᵀ)
        return tuple(grads.unbind(0))


def _gram_form(codes: Tensor, gram: Tensor, anchors: Tensor, norm_eps: float) -> Tensor:
    n_mod, _, n_exp, rank = codes.shape
    blocks = gram.view(n_mod, n_exp, rank, n_exp, rank).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    projected = [((codes * onehot).flatten(2) @ gram).view_as(codes) for onehot in _onehots(codes, anchors)]
    return _cosines(codes, blocks, projected, anchors, norm_eps)  # projected: h_aᵀ G_a,:


def _onehots(codes: Tensor, anchors: Tensor) -> list[Tensor]:
    """Per anchor slot a, (M, N, E, 1): which expert is the a-th anchor of each token."""
    n_mod, n_tokens, n_exp, _ = codes.shape
    zeros = torch.zeros(n_mod, n_tokens, n_exp, 1, dtype=codes.dtype, device=codes.device)
    return [zeros.scatter(2, anchors[:, :, a, None, None], 1.0) for a in range(anchors.shape[2])]


def _cosines(
    codes: Tensor, blocks: Tensor, projected: list[Tensor], anchors: Tensor, norm_eps: float
) -> Tensor:
    """cos(E_a, E_j) (M, N, A, E) from the codes, the diagonal blocks B_jᵀ B_j (M, E, r, r) and each anchor
    slot's h_aᵀ B_aᵀ B_j for every j (M, N, E, r)."""
    codes_e = codes.transpose(1, 2)  # (M, E, N, r)
    sq_norms = ((codes_e @ blocks) * codes_e).sum(-1).transpose(1, 2)  # (M, N, E): ‖E_j‖²
    norms = sq_norms.clamp_min(norm_eps**2).sqrt()
    rows = []
    for a, proj in enumerate(projected):
        dots = (proj * codes).sum(-1)  # (M, N, E): <E_a, E_j>
        rows.append(dots / (norms.gather(2, anchors[:, :, a, None]) * norms))
    return torch.stack(rows, dim=2)


def _dtype_of(lora_B: Tensor | Sequence[Tensor]) -> torch.dtype:
    return lora_B.dtype if isinstance(lora_B, Tensor) else lora_B[0].dtype


def cheaper_cosine_form(n_tokens: int, n_anchors: int, d_out: int, n_exp: int, rank: int) -> str:
    """'gram' or 'anchor', whichever needs fewer multiply-adds for one module (see ``stacked_cosines``)."""
    width = n_exp * rank
    gram = d_out * width * width + n_anchors * n_tokens * width * width
    anchor = d_out * n_exp * rank * rank + 2 * n_anchors * n_tokens * d_out * width
    return "gram" if gram <= anchor else "anchor"


def materialized_cosines(outputs: Tensor, anchors: Tensor, norm_eps: float = 1e-6) -> Tensor:
    """The paper's way: normalise every expert output (N, E, D) and take dot products. Returns (N, A, E)."""
    outputs = outputs.to(torch.promote_types(outputs.dtype, torch.float32))  # >= fp32
    unit = outputs / outputs.norm(dim=-1, keepdim=True).clamp_min(norm_eps)
    queries = unit.gather(1, anchors[..., None].expand(-1, -1, unit.shape[-1]))  # (N, A, D)
    return torch.einsum("nad,ned->nae", queries, unit)


def info_nce(
    cosines: Tensor,
    anchors: Tensor,
    active: Tensor,
    negatives: Tensor,
    temperature: float,
    epsilon: float,
    token_mask: Tensor | None = None,
) -> ContrastiveOutput:
    """Algorithm 1 from cosines (N, A, E): −log(Σ exp(s_pos) / (Σ exp([s_pos, s_neg]) + ε)), in log space.

    The anchor itself is in neither sum. With several anchors (Eq. 12) their losses are averaged.
    One module of ``stacked_info_nce``.
    """
    out = stacked_info_nce(
        cosines[None], anchors[None], active[None], negatives[None], temperature, epsilon, token_mask
    )
    return ContrastiveOutput(*(t[0] for t in out))


def stacked_info_nce(
    cosines: Tensor,
    anchors: Tensor,
    active: Tensor,
    negatives: Tensor,
    temperature: float,
    epsilon: float,
    token_mask: Tensor | None = None,
    anchor_mask: Tensor | None = None,
) -> ContrastiveOutput:
    """``info_nce`` for M modules at once: cosines (M, N, A, E), anchors (M, N, A), active and negatives
    (M, N, E), one token mask (N,) for all. Every field of the result is (M,): one value per module.

    ``anchor_mask`` (M, N, A) bool, for routings whose sets vary in size: only the anchors it keeps that
    have a positive count, and a token without any (it selected one expert) is left out of the mean."""
    logits = cosines / temperature
    not_anchor = torch.ones_like(logits, dtype=torch.bool).scatter_(3, anchors[..., None], False)
    positive = active[:, :, None, :] & not_anchor
    negative = negatives[:, :, None, :].expand_as(positive)
    neg_inf = torch.finfo(logits.dtype).min
    lse_pos = logits.masked_fill(~positive, neg_inf).logsumexp(-1)
    lse_all = logits.masked_fill(~(positive | negative), neg_inf).logsumexp(-1)
    if epsilon > 0:
        lse_all = torch.logaddexp(lse_all, torch.full_like(lse_all, math.log(epsilon)))
    if anchor_mask is None:
        per_token = (lse_all - lse_pos).mean(dim=2)  # (M, N)
        weights = _token_weights(token_mask, per_token)  # elementwise sums: fp32 under autocast too
    else:
        valid = anchor_mask & positive.any(-1)  # (M, N, A)
        per_anchor = (lse_all - lse_pos).masked_fill(~valid, 0.0)
        counted = valid.sum(-1)
        per_token = per_anchor.sum(-1) / counted.clamp_min(1)
        weights = _token_weights(token_mask, per_token, counted > 0)
    loss = (per_token * weights).sum(-1)
    if anchor_mask is not None:  # the logged cosines: anchors that are selected experts only
        positive = positive & anchor_mask[..., None]
        negative = negative & anchor_mask[..., None]
    with torch.no_grad():
        cos = cosines.detach()
        pos_cos = (_mean_where(cos, positive) * weights).sum(-1)
        neg_cos = (_mean_where(cos, negative) * weights).sum(-1)
    return ContrastiveOutput(loss, pos_cos, neg_cos)


def _token_weights(token_mask: Tensor | None, per_token: Tensor, counted: Tensor | None = None) -> Tensor:
    """Weights of a mean over the unmasked tokens (all tokens without a mask), (N,), or (M, N) where
    ``counted`` (M, N) leaves tokens out per module; no host sync."""
    n_tokens = per_token.shape[-1]
    if counted is None:
        if token_mask is None:
            return torch.full((n_tokens,), 1.0 / n_tokens, dtype=per_token.dtype, device=per_token.device)
        weights = token_mask.to(per_token.dtype)
        return weights / weights.sum().clamp_min(1.0)
    weights = counted.to(per_token.dtype)
    if token_mask is not None:
        weights = weights * token_mask.to(per_token.dtype)
    return weights / weights.sum(-1, keepdim=True).clamp_min(1.0)


def _mean_where(values: Tensor, where: Tensor) -> Tensor:
    """Per-token mean of ``values`` (M, N, A, E) over the entries where ``where`` holds: (M, N)."""
    where = where.to(values.dtype)
    return (values * where).sum((2, 3)) / where.sum((2, 3)).clamp_min(1.0)


def contrastive_loss(
    codes: Tensor,
    lora_B: Tensor,
    topk_idx: Tensor,
    *,
    temperature: float,
    epsilon: float = 1e-3,
    anchors: Tensor,
    negatives: Tensor,
    token_mask: Tensor | None = None,
    norm_eps: float = 1e-6,
) -> ContrastiveOutput:
    """CoMoE's contrastive loss in Gram form. See ``gram_cosines`` and ``info_nce``."""
    cos = gram_cosines(codes, lora_B, anchors, norm_eps)
    active = active_mask(topk_idx, codes.shape[1])
    return info_nce(cos, anchors, active, negatives, temperature, epsilon, token_mask)


def stacked_contrastive_loss(
    codes: Tensor,
    lora_B: Tensor | Sequence[Tensor],
    topk_idx: Tensor,
    *,
    temperature: float,
    epsilon: float = 1e-3,
    anchors: Tensor,
    negatives: Tensor,
    token_mask: Tensor | None = None,
    norm_eps: float = 1e-6,
    form: str = "auto",
    gram: Tensor | None = None,
) -> ContrastiveOutput:
    """``contrastive_loss`` of M modules in one call: codes (M, N, E, r), lora_B (M, D, E*r) or a list of M
    (D_m, E*r), topk_idx and anchors (M, N, ·), negatives (M, N, E); each field of the result is (M,).
    ``gram``: the modules' Gram matrices, already computed (then ``lora_B`` may be None)."""
    cos = stacked_cosines(codes, lora_B, anchors, norm_eps, form, gram)
    n_mod, n_tokens, n_exp, _ = codes.shape
    active = active_mask(topk_idx.reshape(n_mod * n_tokens, -1), n_exp).view(n_mod, n_tokens, n_exp)
    return stacked_info_nce(cos, anchors, active, negatives, temperature, epsilon, token_mask)


def contrastive_loss_materialized(
    outputs: Tensor,
    topk_idx: Tensor,
    *,
    temperature: float,
    epsilon: float = 1e-3,
    anchors: Tensor,
    negatives: Tensor,
    token_mask: Tensor | None = None,
    norm_eps: float = 1e-6,
) -> ContrastiveOutput:
    """CoMoE's contrastive loss from the materialised expert outputs (N, E, D), as the paper computes it."""
    cos = materialized_cosines(outputs, anchors, norm_eps)
    active = active_mask(topk_idx, outputs.shape[1])
    return info_nce(cos, anchors, active, negatives, temperature, epsilon, token_mask)


def load_balancing_loss(
    probs: Tensor,
    topk_idx: Tensor | None = None,
    token_mask: Tensor | None = None,
    *,
    share: Tensor | None = None,
) -> Tensor:
    """Switch/Mixtral balance loss E · Σ_e f_e · P_e over unmasked tokens.

    probs: (N, E) router softmax; f_e is the share of the assignments that go to expert e: of the top-k
    assignments ``topk_idx`` (N, k), or of the soft routing's probabilities when it is None, or given as
    ``share`` (N, E), each token's assignment spread over its experts (``Routing.share``, for sets that vary
    in size); P_e the mean router probability. Equals 1 when uniform.
    """
    n_exp = probs.shape[1]
    if share is None:
        share = (
            probs if topk_idx is None else active_mask(topk_idx, n_exp).to(probs.dtype) / topk_idx.shape[1]
        )
    fraction = _masked_token_mean(share, token_mask)
    mean_prob = _masked_token_mean(probs, token_mask)
    return n_exp * (fraction * mean_prob).sum()


def _masked_token_mean(values: Tensor, token_mask: Tensor | None) -> Tensor:
    """Mean over tokens (dim 0) of (N, E) values, per expert."""
    if token_mask is None:
        return values.mean(0)
    weights = token_mask.to(values.dtype)[:, None]
    return (values * weights).sum(0) / weights.sum().clamp_min(1.0)
