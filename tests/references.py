"""Slow, obviously-correct references the fast implementations are tested against."""

from __future__ import annotations

import torch


def reference_contrastive(outputs, topk_idx, anchors, negatives, *, temperature, epsilon, token_mask=None):
    """outputs (N, E, D) expert outputs; anchors (N, A) expert ids; negatives (N, E) bool.

    Per token and anchor a: q = normalize(E_a), P = the other activated experts, N = the negatives,
    L = −log(Σ exp(s_pos) / (Σ exp([s_pos, s_neg]) + ε)). Eq. 12: mean over the anchors. Then the mean over
    the unmasked tokens.
    """
    per_token = []
    for n in range(outputs.shape[0]):
        if token_mask is not None and not bool(token_mask[n]):
            continue
        losses = []
        for a in anchors[n].tolist():
            q = outputs[n, a] / outputs[n, a].norm()
            pos = [j for j in topk_idx[n].tolist() if j != a]
            neg = [j for j in range(outputs.shape[1]) if bool(negatives[n, j])]
            P = torch.stack([outputs[n, j] / outputs[n, j].norm() for j in pos])
            s_pos = P @ q / temperature
            s_all = s_pos
            if neg:
                Nn = torch.stack([outputs[n, j] / outputs[n, j].norm() for j in neg])
                s_all = torch.cat([s_pos, Nn @ q / temperature])
            losses.append(-torch.log(torch.exp(s_pos).sum() / (torch.exp(s_all).sum() + epsilon)))
        per_token.append(torch.stack(losses).mean())
    return torch.stack(per_token).mean()


def reference_route(router, x, *, num_experts, top_k, routing="topk", top_p=None):
    """One token's experts and gate weights: an fp32 (fp64 if asked) softmax, then top-k renormalised
    ("topk"), every expert with its probability ("soft"), or experts taken best first until their
    probabilities reach ``top_p``, at most ``top_k`` of them, renormalised ("topp")."""
    dtype = torch.promote_types(router.dtype, torch.float32)
    probs = torch.softmax(router.to(dtype) @ x.to(dtype), dim=0)
    if routing == "soft":
        return list(range(num_experts)), probs
    if routing == "topp":
        chosen, mass = [], 0.0
        for expert in probs.argsort(descending=True).tolist()[:top_k]:
            if mass >= top_p:
                break
            chosen.append(expert)
            mass += probs[expert].item()
        weights = probs[chosen]
        return chosen, weights / weights.sum()
    top_w, top_i = torch.topk(probs, top_k)
    return top_i.tolist(), top_w / top_w.sum()
