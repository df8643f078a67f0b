"""The auxiliary losses of one forward, formed from the layers' traces after the model's forward.

``losses_from_traces`` is the only place the contrastive and balance losses are composed. It reads
activations only (``comoe.trace``): each layer formed what needs its weights (the Gram matrices, DoRA's
and FFN experts' materialised outputs) inside its own forward. The Gram-form losses of calls with the same
token count and settings are computed together, one batched computation per group: the loss is ~100 small
ops, paid once per group instead of once per module.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from comoe.gram_loss import gram_group_loss
from comoe.losses import (
    ContrastiveOutput,
    anchor_mask,
    draw_anchors,
    load_balancing_loss,
    materialized_cosines,
    negatives_among,
    stacked_cosines,
    stacked_info_nce,
)
from comoe.recompute import recomputed
from comoe.trace import ForwardContext, LayerTrace, ModuleAux


def losses_from_traces(ctx: ForwardContext, training: bool) -> list[ModuleAux]:
    """Each traced call's losses (as ``ctx`` asks for them), handed with its routing to ``ctx.recorder``.

    fp32 whatever the model's autocast, on every device the traces sit on (cpu and cuda under
    device_map). ``training``: the model is in training mode (then a loss without autograd history is an
    error)."""
    traces = ctx.traces
    if not traces:
        return []
    kinds = sorted({trace.routing.gates.device.type for trace in traces})
    with torch.autocast(kinds[0], enabled=False), torch.autocast(kinds[-1], enabled=False):
        stacked = stacked_contrastive(traces, ctx) if ctx.compute_contrastive else {}
        aux = []
        for index, trace in enumerate(traces):
            mask = ctx.mask_for(trace.routing.gates.shape[0])
            con = stacked.get(index)
            if con is None and ctx.compute_contrastive and trace.contrastive is not None:
                con = contrastive_of(trace, mask)
            bal = None
            if ctx.compute_balance:
                bal = load_balancing_loss(trace.routing.probs, token_mask=mask, share=trace.routing.share())
            if training and torch.is_grad_enabled():
                check_differentiable(trace, con, bal)
            if con is not None or bal is not None:
                aux.append(ModuleAux(trace.name, con, bal))
            if ctx.recorder is not None:
                ctx.recorder.observe(trace, mask, ctx.task_ids, con)
    return aux


def contrastive_of(trace: LayerTrace, token_mask: Tensor | None) -> ContrastiveOutput:
    """One call's contrastive loss on its own, drawing its anchors and negatives."""
    cfg, routing, inputs = trace.config, trace.routing, trace.contrastive
    n_exp = routing.gates.shape[1]
    anchors = draw_anchors(routing.selected, cfg.anchor, routing.slot_mask)
    valid = anchor_mask(anchors, cfg.anchor, routing.slot_mask)
    active = routing.active(n_exp)
    negatives = negatives_among(~active, cfg.num_negatives)
    if inputs.cosines is not None:
        rows = anchors[..., None].expand(-1, -1, n_exp)
        cos = inputs.cosines.gather(1, rows)[None]
    elif inputs.outputs is not None:
        cos = materialized_cosines(inputs.outputs, anchors, cfg.norm_eps)[None]
    else:
        codes = inputs.codes.to(torch.promote_types(inputs.codes.dtype, torch.float32))
        codes = codes.view(codes.shape[0], n_exp, -1)
        cos = stacked_cosines(codes[None], None, anchors[None], cfg.norm_eps, gram=inputs.gram[None])
    out = stacked_info_nce(
        cos,
        anchors[None],
        active[None],
        negatives[None],
        cfg.temperature,
        cfg.epsilon,
        token_mask,
        None if valid is None else valid[None],
    )
    return ContrastiveOutput(*(t[0] for t in out))


def stacked_contrastive(traces: list[LayerTrace], ctx: ForwardContext) -> dict[int, ContrastiveOutput]:
    """The Gram-form contrastive losses of the traced calls that share token count, E, r and settings, by
    their index in ``traces``: one batched computation per group of two or more, its anchors and negatives
    drawn at once. Calls that stand alone are left to ``contrastive_of``."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, trace in enumerate(traces):
        inputs = trace.contrastive
        if inputs is not None and inputs.gram is not None:
            codes = inputs.codes
            groups[(id(trace.config), codes.shape, codes.dtype, codes.device)].append(index)
    results = {}
    for indices in groups.values():
        if len(indices) > 1:
            results.update(_group_contrastive([traces[i] for i in indices], indices, ctx))
    return results


def _group_contrastive(
    group: list[LayerTrace], indices: list[int], ctx: ForwardContext
) -> dict[int, ContrastiveOutput]:
    """One group's losses. Where a module asks for it (E·r ≥ d_in/4, where the cosines' N × E·r
    intermediates weigh as much as what the layers keep) only the cosines' inputs are kept (the codes, which
    the layers keep anyway, and the Gram matrices) and the cosines are recomputed in backward; below that
    recomputing costs ~4 % of a SmolLM2 step for little memory (``benchmarks/memory_lean.py``). The InfoNCE
    part works on (N, A, E) cosines and keeps its own."""
    cfg = group[0].config
    routings = [trace.routing for trace in group]
    selected = torch.stack([r.selected for r in routings])  # (M, N, k)
    n_mod, n_tokens, _ = selected.shape
    n_exp = routings[0].gates.shape[1]
    slot_mask = valid = None
    if routings[0].slot_mask is None and cfg.anchor == "random":  # draw_anchors' draws, in their shape
        pos = torch.randint(0, selected.shape[-1], (n_mod, n_tokens, 1), device=selected.device)
        anchors = selected.gather(2, pos)
    elif routings[0].slot_mask is None:  # every selected expert is an anchor
        anchors = selected
    else:
        slot_mask = torch.stack([r.slot_mask for r in routings]).view(n_mod * n_tokens, -1)
        flat_anchors = draw_anchors(selected.view(n_mod * n_tokens, -1), cfg.anchor, slot_mask)
        valid = anchor_mask(flat_anchors, cfg.anchor, slot_mask)
        anchors = flat_anchors.view(n_mod, n_tokens, -1)
    active = torch.zeros(n_mod, n_tokens, n_exp, dtype=torch.bool, device=selected.device)
    active.scatter_(2, selected, True if slot_mask is None else slot_mask.view_as(selected))  # (M, N, E)
    negatives = ~active
    if cfg.num_negatives is not None:
        negatives = negatives_among(negatives.view(n_mod * n_tokens, n_exp), cfg.num_negatives).view_as(
            active
        )
    codes = [trace.contrastive.codes for trace in group]  # (N, E·r) each
    grams = [trace.contrastive.gram for trace in group]  # (E·r, E·r) each
    mask = ctx.mask_for(n_tokens)
    if group_node_applies(valid):
        weights = token_weights(mask, n_tokens, codes[0].device)
        out = gram_group_loss(
            codes,
            grams,
            anchors,
            active,
            negatives,
            weights,
            cfg.temperature,
            cfg.epsilon,
            cfg.norm_eps,
            every_negative=cfg.num_negatives is None,
        )
        return _by_module(out, indices)
    cosines_of = partial(_group_cosines, cfg.norm_eps, n_exp)
    recompute = any(trace.contrastive.recompute for trace in group)
    if recompute and not torch.compiler.is_compiling():  # a compiler decides what to keep itself
        (cos,) = recomputed(cosines_of, anchors, *codes, *grams)
    else:
        (cos,) = cosines_of(anchors, *codes, *grams)
    valid = None if valid is None else valid.view(n_mod, n_tokens, -1)
    out = stacked_info_nce(cos, anchors, active, negatives, cfg.temperature, cfg.epsilon, mask, valid)
    return _by_module(out, indices)


def group_node_applies(anchor_valid: Tensor | None) -> bool:
    """Whether a group's loss is one autograd node (``comoe.gram_loss``): fixed-size expert sets (no anchor
    mask), outside torch.compile (which plans the plain ops itself)."""
    return anchor_valid is None and not torch.compiler.is_compiling()


def _by_module(out: ContrastiveOutput, indices: list[int]) -> dict[int, ContrastiveOutput]:
    """A group's losses (each field (M,)) by the traces' indices."""
    per_module = zip(out.loss.unbind(), out.pos_cos.unbind(), out.neg_cos.unbind(), strict=True)
    return {index: ContrastiveOutput(*parts) for index, parts in zip(indices, per_module, strict=True)}


def token_weights(token_mask: Tensor | None, n_tokens: int, device: torch.device) -> Tensor:
    """(N,) fp32: each token's weight in the mean over unmasked tokens (all tokens without a mask)."""
    if token_mask is None:
        return torch.full((n_tokens,), 1.0 / n_tokens, device=device)
    weights = token_mask.to(torch.float32)
    return weights / weights.sum().clamp_min(1.0)


def _group_cosines(norm_eps: float, n_exp: int, anchors: Tensor, *codes_and_grams: Tensor) -> tuple[Tensor]:
    """``stacked_cosines`` of a group from its M codes (N, E, r) followed by their M Gram matrices."""
    n_mod, n_tokens = anchors.shape[:2]
    gram = torch.stack(codes_and_grams[n_mod:])
    codes = torch.stack(codes_and_grams[:n_mod]).view(n_mod, n_tokens, n_exp, -1)
    return (stacked_cosines(codes, None, anchors, norm_eps, gram=gram),)


def check_differentiable(trace: LayerTrace, con: ContrastiveOutput | None, bal: Tensor | None) -> None:
    """A weighted aux loss computed from tensors without autograd history would silently add nothing to
    the gradient: that is what reentrant activation checkpointing does (its forward runs under no_grad).
    Refuse it loudly."""
    cfg, probs = trace.config, trace.routing.probs  # probs: None where no balance loss or record reads them
    # each loss by what it differentiates: the contrastive term the experts' tensors, the balance term the
    # router's softmax (a record's softmax may come without autograd: the fused node returns it detached)
    lost_contrastive = (
        con is not None
        and cfg.contrastive_weight > 0
        and trace.adapter_trains
        and not trace.contrastive.has_grad
    )
    lost_balance = (
        bal is not None
        and cfg.balance_weight > 0
        and trace.router_trains
        and probs is not None
        and not probs.requires_grad
    )
    if lost_contrastive or lost_balance:
        raise RuntimeError(
            f"{trace.name}: the auxiliary losses were computed without autograd history, so they "
            "would add nothing to the gradient. Reentrant activation checkpointing does this; enable it "
            "with gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default)."
        )


@dataclass
class AuxLosses:
    """The auxiliary losses of the last forward, averaged over adapted modules."""

    contrastive: Tensor | None
    balance: Tensor | None
    pos_cos: Tensor | None
    neg_cos: Tensor | None
    total: Tensor  # contrastive_weight · contrastive + balance_weight · balance

    def output_fields(self) -> dict[str, Tensor]:
        """The tensors a model output carries: ``aux_loss`` (weighted total) and the unweighted parts."""
        fields = {"aux_loss": self.total}
        if self.contrastive is not None:
            fields["contrastive_loss"] = self.contrastive
        if self.balance is not None:
            fields["balance_loss"] = self.balance
        return fields


def combined_aux(aux: list[ModuleAux], config) -> AuxLosses | None:
    """The forward's auxiliary losses, each averaged over the modules, and their weighted total."""
    if not aux:
        return None
    cons = [a.contrastive for a in aux if a.contrastive is not None]
    bals = [a.balance for a in aux if a.balance is not None]
    contrastive = _module_mean([c.loss for c in cons])
    balance = _module_mean(bals)
    terms = [config.contrastive_weight * contrastive] if contrastive is not None else []
    if balance is not None:
        terms.append(config.balance_weight * balance)
    total = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return AuxLosses(
        contrastive,
        balance,
        _module_mean([c.pos_cos for c in cons]),
        _module_mean([c.neg_cos for c in cons]),
        total,
    )


def _module_mean(values: list[Tensor]) -> Tensor | None:
    """The mean of one scalar per module. Where they are, in order, the rows of one group's (M,) tensor
    (``_by_module``), that tensor's mean: the same values, without stacking the rows again (and taking
    their gradients apart again in backward)."""
    if not values:
        return None
    base = values[0]._base
    if (
        not torch.compiler.is_compiling()  # a traced view has no storage to compare
        and base is not None
        and base.dim() == 1
        and base.numel() == len(values)
        and all(v._base is base for v in values)
        and [v.storage_offset() for v in values]
        == [base.storage_offset() + i * base.stride(0) for i in range(len(values))]
    ):
        return base.mean()
    return torch.stack(values).mean()


def token_share(labels: Tensor | None, num_items_in_batch: Tensor | int | None) -> Tensor | float:
    """This micro-batch's labelled (predicted) tokens over ``num_items_in_batch``; 1 when that is not given."""
    if num_items_in_batch is None or labels is None:
        return 1.0
    predicted = labels[..., 1:] if labels.dim() >= 2 else labels  # causal LMs predict labels[1:]
    return (predicted != -100).sum() / num_items_in_batch
