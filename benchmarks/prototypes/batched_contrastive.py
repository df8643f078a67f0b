"""Prototype (not used by the library): compute the Gram contrastive loss of all modules with the same shapes in ONE batched call.

Monkeypatches ForwardContext.collect (layer.py). Pending (layer, codes, probs, top_idx) entries whose
layers use the Gram form, no balance loss and no recorder are grouped by (codes shape, B shape, loss
settings); each group runs gram cosines + InfoNCE with a leading module dimension (bmm instead of mm),
and still yields one ContrastiveOutput per module (per-module masked means), so AuxLosses is unchanged.
Written against src/comoe/layer.py as of this benchmark run (ForwardContext.pending / collect).
With anchor='all' and num_negatives=None it reproduces the per-module loss, its cosine means and every
adapter gradient (``measure.py --check``); with random anchors or sampled negatives the draws consume the
RNG in another order, so the values agree in distribution, not bit for bit.
"""

import math
from collections import defaultdict

import torch
from torch import Tensor

import comoe.layer as L
from comoe.losses import ContrastiveOutput, draw_negatives


def batched_gram_cosines(codes: Tensor, lora_B: Tensor, anchors: Tensor, norm_eps: float) -> Tensor:
    """codes (M, N, E, r), lora_B (M, D, E*r), anchors (M, N, A) -> cosines (M, N, A, E)."""
    m, n, e, r = codes.shape
    dtype = torch.promote_types(torch.promote_types(codes.dtype, lora_B.dtype), torch.float32)
    codes = codes.to(dtype)
    lora_B = lora_B.to(dtype)
    gram = torch.bmm(lora_B.transpose(1, 2), lora_B)  # (M, E*r, E*r)
    diag = gram.view(m, e, r, e, r).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)  # (M, E, r, r)
    codes_e = codes.permute(0, 2, 1, 3)  # (M, E, N, r)
    sq_norms = (torch.matmul(codes_e, diag) * codes_e).sum(-1).transpose(1, 2)  # (M, N, E)
    norms = sq_norms.clamp_min(norm_eps**2).sqrt()
    rows = []
    for a in range(anchors.shape[2]):
        onehot = torch.zeros(m, n, e, 1, dtype=codes.dtype, device=codes.device)
        onehot.scatter_(2, anchors[:, :, a, None, None], 1.0)
        projected = torch.bmm((codes * onehot).view(m, n, e * r), gram).view(m, n, e, r)
        dots = (projected * codes).sum(-1)  # (M, N, E)
        anchor_norm = norms.gather(2, anchors[:, :, a, None])
        rows.append(dots / (anchor_norm * norms))
    return torch.stack(rows, dim=2)


def batched_info_nce(cos, anchors, active, negatives, temperature, epsilon, token_mask):
    """cos (M, N, A, E) -> per-module (loss, pos_cos, neg_cos), each (M,)."""
    logits = cos / temperature
    not_anchor = torch.ones_like(logits, dtype=torch.bool).scatter_(3, anchors[..., None], False)
    positive = active[:, :, None, :] & not_anchor
    negative = negatives[:, :, None, :].expand_as(positive)
    neg_inf = torch.finfo(logits.dtype).min
    lse_pos = logits.masked_fill(~positive, neg_inf).logsumexp(-1)
    lse_all = logits.masked_fill(~(positive | negative), neg_inf).logsumexp(-1)
    if epsilon > 0:
        lse_all = torch.logaddexp(lse_all, torch.full_like(lse_all, math.log(epsilon)))
    per_token = (lse_all - lse_pos).mean(dim=2)  # (M, N)
    if token_mask is None:
        w = torch.full_like(per_token[0], 1.0 / per_token.shape[1])
    else:
        w = token_mask.to(per_token.dtype)
        w = w / w.sum().clamp_min(1.0)
    loss = per_token @ w  # (M,)
    with torch.no_grad():
        c = cos.detach()

        def mean_where(where):
            wf = where.to(c.dtype)
            return ((c * wf).sum((2, 3)) / wf.sum((2, 3)).clamp_min(1.0)) @ w

        pos_cos, neg_cos = mean_where(positive), mean_where(negative)
    return loss, pos_cos, neg_cos


def batched_collect(self):
    pending, self.pending = self.pending, []
    groups = defaultdict(list)
    rest = []
    for item in pending:
        layer, codes, probs, top_idx = item
        cfg = layer.config
        ok = (
            self.compute_contrastive
            and not self.compute_balance
            and self.recorder is None
            and codes is not None
            and top_idx is not None
            and layer._has_contrastive()
            and cfg.contrastive_form == "gram"
        )
        if ok:
            key = (
                tuple(codes.shape),
                tuple(layer.comoe_B.shape),
                cfg.temperature,
                cfg.epsilon,
                cfg.anchor,
                cfg.num_negatives,
                cfg.norm_eps,
                layer.num_experts,
                layer.r,
            )
            groups[key].append(item)
        else:
            rest.append(item)
    for layer, codes, probs, top_idx in rest:
        layer._auxiliary(codes, probs, top_idx)
    for items in groups.values():
        layer0 = items[0][0]
        cfg, e, r = layer0.config, layer0.num_experts, layer0.r
        n = items[0][1].shape[0]
        token_mask = self.token_mask if self.token_mask is not None and self.token_mask.numel() == n else None
        codes = torch.stack([c for _, c, _, _ in items]).view(len(items), n, e, r)
        top_idx = torch.stack([t for _, _, _, t in items])  # (M, N, k)
        lora_B = torch.stack([lay.comoe_B for lay, _, _, _ in items])  # (M, D, E*r)
        m, _, k = top_idx.shape
        if cfg.anchor == "all":
            anchors = top_idx
        else:
            pos = torch.randint(0, k, (m, n, 1), device=top_idx.device)
            anchors = top_idx.gather(2, pos)
        flat = top_idx.view(m * n, k)
        negatives = draw_negatives(flat, e, cfg.num_negatives).view(m, n, e)
        active = (
            torch.zeros(m * n, e, dtype=torch.bool, device=flat.device).scatter_(1, flat, True).view(m, n, e)
        )
        cos = batched_gram_cosines(codes, lora_B, anchors, cfg.norm_eps)
        loss, pos_cos, neg_cos = batched_info_nce(
            cos, anchors, active, negatives, cfg.temperature, cfg.epsilon, token_mask
        )
        for i, (layer, _, _, _) in enumerate(items):
            self.aux.append(
                L.ModuleAux(layer.module_name, ContrastiveOutput(loss[i], pos_cos[i], neg_cos[i]), None)
            )
    return self.aux


ORIGINAL_COLLECT = L.ForwardContext.collect


def patch():
    L.ForwardContext.collect = batched_collect


def unpatch():
    L.ForwardContext.collect = ORIGINAL_COLLECT
