"""A routed linear's training step as one autograd node: router, top-k gates, dropout, LoRA experts and the
residual add, with a hand-written backward.

    logits = x Rᵀ,   g = the softmax of the top-k logits, zero elsewhere,   codes = (x ⊙ keep) A_catᵀ,
    out = base_out + (codes ⊙ g S) B_catᵀ,   S = spread_matrix(E, r, s / (1 − p))

On a GPU a step of a few thousand tokens is host-bound: each operator is a launch and some microseconds
of Python. As plain ops (the router, ``topk_gates``, ``comoe.dense``'s node, the add) autograd records the
top-k softmax, its scatter and the gating's views and differentiates each; here the forward runs the
fewest operators that compute the same function, and the backward is written out:

- the gates reach the codes through one product with a constant (E, E·r) block matrix that repeats each
  gate over its expert's r codes and carries the LoRA scaling and the dropout's 1/(1 − p) (``spread``):
  the gated codes in one product and one multiply, no views; the gate gradient in one product back;
- the gates are the softmax of the top-k logits scattered into zeros, which is the softmax of the logits
  with the unselected ones at −∞, so the logits' gradient is one softmax backward over all E (zero where
  unselected), not gather, softmax backward and scatter;
- the update is added to the base output in one ``addmm``, whose gradient with respect to the base
  output is the incoming gradient itself;
- the dropout mask is drawn as uint8 (the same draws as ``nn.Dropout``'s on the CPU, and a float × uint8
  product takes the fast path) and kept for backward, where x ⊙ keep is formed again: the node keeps x,
  the mask, the codes and the gates, as the dense node does.

With the contrastive term on, the node also returns the codes (with the dropout's scale, as the plain
ops form them) and the Gram matrix G = B_catᵀ B_cat, whose gradients it takes in the same backward.

The same function as the plain ops up to float rounding (the scalings are applied in another order):
tested against them, and in float64 against ``torch.autograd.gradcheck``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

_FLOATS = (torch.float32, torch.float64)


class RoutedOutput(NamedTuple):
    """What one call of ``routed_lora`` returns."""

    out: Tensor  # (N, d_out): the base output plus the experts' update
    gates: Tensor  # (N, E) fp32: the top-k softmax, zero for unselected experts (no autograd history)
    selected: Tensor  # (N, k): the selected experts, best first
    probs: Tensor | None  # (N, E): the router's softmax, where asked for
    codes: Tensor | None  # (N, E·r): every expert's code, with the contrastive term
    gram: Tensor | None  # (E·r, E·r): B_catᵀ B_cat in fp32 (fp64), with the contrastive term


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """Dropout's keep mask as uint8, drawn as ``comoe.dense.dropout_keep`` (and ``nn.Dropout`` on the CPU)
    draws it: a float × uint8 product takes the fast path, and no bool → uint8 view is needed."""
    return torch.empty_like(x, dtype=torch.uint8).bernoulli_(1.0 - p)


def router_dtype(weight: Tensor) -> torch.dtype:
    """The dtype the router computes in: fp32, or fp64 for an fp64 weight (no dispatched op)."""
    return weight.dtype if weight.dtype in _FLOATS else torch.float32


def spread_matrix(num_experts: int, rank: int, scale: float, device, dtype) -> Tensor:
    """(E, E·r): row e holds ``scale`` on expert e's r columns, zero elsewhere; g @ it repeats each gate
    over its expert's codes, scaled (exact: every other term of each sum is a zero)."""
    eye = torch.eye(num_experts, device=device, dtype=dtype) * scale
    return eye.repeat_interleave(rank, dim=1).contiguous()


def routed_lora(
    x: Tensor,
    base_out: Tensor,
    router: Tensor,
    lora_A: Tensor,
    lora_B: Tensor,
    keep: Tensor | None,
    spread: Tensor,
    spread_t: Tensor,
    top_k: int,
    keep_scale: float,
    product: torch.dtype,
    probs: str | None = None,
    contrastive: bool = False,
) -> RoutedOutput:
    """The node's outputs. x (N, d_in) in the adapter's dtype (or autocast's); base_out (N, d_out);
    router (E, d_in); lora_A (E·r, d_in); lora_B (d_out, E·r); keep: dropout's uint8 keep mask or None;
    spread / spread_t: ``spread_matrix`` with scale s / (1 − p) and its transpose (contiguous); product:
    the dtype the expert products run in; probs: ``"grad"`` (the balance loss differentiates them),
    ``"plain"`` (records read them) or None; contrastive: also return the codes and G."""
    side: list[Tensor] = []  # the gates leave the node beside its outputs: an output it saved costs two ops
    outs = _RoutedLora.apply(
        x,
        base_out,
        router,
        lora_A,
        lora_B,
        keep,
        spread,
        spread_t,
        top_k,
        keep_scale,
        product,
        probs,
        contrastive,
        side,
    )
    out, selected, probs_out, codes, gram = outs
    return RoutedOutput(out, side[0], selected, probs_out, codes, gram)


class _RoutedLora(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        base_out,
        router,
        lora_A,
        lora_B,
        keep,
        spread,
        spread_t,
        top_k,
        keep_scale,
        product,
        probs,
        con,
        side,
    ):  # noqa: D102
        r_dtype = router_dtype(router)
        with torch.autocast(x.device.type, enabled=False):
            x_r = x if x.dtype == r_dtype else x.to(r_dtype)
            logits = torch.mm(x_r, router.t())
            top_logits, selected = logits.topk(top_k, dim=-1)
            gates = torch.zeros_like(logits).scatter_(1, selected, top_logits.softmax(dim=-1))
            prob = logits.softmax(dim=-1) if probs is not None else None
            x_drop = _dropped(x, keep, keep_scale)
            if x_drop.dtype != product:
                x_drop = x_drop.to(product)
            a = lora_A if lora_A.dtype == product else lora_A.to(product)
            b = lora_B if lora_B.dtype == product else lora_B.to(product)
            codes = torch.mm(x_drop, a.t())
            wide = torch.mm(gates, spread)
            gated = codes * (wide if wide.dtype == product else wide.to(product))
            if base_out.dtype == product:
                out = torch.addmm(base_out, gated, b.t())
            else:
                out = base_out + torch.mm(gated, b.t()).to(base_out.dtype)
            codes_out = gram = None
            if con:
                codes_out = codes.view_as(codes)  # an output it does not save: no detach at save or unpack
                g_dtype = router_dtype(lora_B)
                b_full = lora_B if lora_B.dtype == g_dtype else lora_B.to(g_dtype)
                gram = torch.mm(b_full.t(), b_full)
        saved = [x, keep, router, lora_A, lora_B, gates, codes, spread, spread_t]
        ctx.save_for_backward(*saved, prob if probs == "grad" else None)
        ctx.keep_scale, ctx.product, ctx.r_dtype = keep_scale, product, r_dtype
        ctx.mark_non_differentiable(selected)
        if probs != "grad" and prob is not None:
            ctx.mark_non_differentiable(prob)
        ctx.set_materialize_grads(False)
        side.append(gates)
        return out, selected, prob, codes_out, gram

    @staticmethod
    def backward(ctx, grad_out, _selected, grad_probs, grad_codes_in, grad_gram):  # noqa: D102
        x, keep, router, lora_A, lora_B, gates, codes, spread, spread_t, prob = ctx.saved_tensors
        product, r_dtype = ctx.product, ctx.r_dtype
        needs = ctx.needs_input_grad
        grad_x = grad_base = grad_router = grad_a = grad_b = None
        with torch.autocast(x.device.type, enabled=False):
            a = lora_A if lora_A.dtype == product else lora_A.to(product)
            b = lora_B if lora_B.dtype == product else lora_B.to(product)
            grad_codes = grad_gates = None
            if grad_out is not None:
                if needs[1]:
                    grad_base = grad_out
                g_out = grad_out if grad_out.dtype == product else grad_out.to(product)
                wide = torch.mm(gates, spread)
                wide = wide if wide.dtype == product else wide.to(product)
                grad_gated = torch.mm(g_out, b)  # (N, E·r)
                if grad_codes_in is None:
                    grad_codes = grad_gated * wide
                else:  # the contrastive loss's gradient of the codes joins in the same op
                    grad_codes = torch.addcmul(grad_codes_in.to(product), grad_gated, wide)
                    grad_codes_in = None
                if needs[0] or needs[2]:
                    grad_gates = torch.mm((grad_gated * codes).to(spread_t.dtype), spread_t)
                if needs[4]:
                    grad_b = torch.mm(g_out.t(), codes * wide)
            if grad_codes_in is not None:
                grad_codes_in = grad_codes_in.to(product)
                grad_codes = grad_codes_in if grad_codes is None else grad_codes + grad_codes_in
            if grad_gram is not None and needs[4]:
                g_dtype = router_dtype(lora_B)
                b_full = lora_B if lora_B.dtype == g_dtype else lora_B.to(g_dtype)
                sym = grad_gram + grad_gram.t()  # d(BᵀB) = B (Ḡ + Ḡᵀ)
                if grad_b is None:
                    grad_b = torch.mm(b_full, sym)
                else:  # in G's dtype (fp32 under autocast too), as autograd would add the two
                    grad_b = torch.addmm(
                        grad_b if grad_b.dtype == g_dtype else grad_b.to(g_dtype), b_full, sym
                    )
            if grad_b is not None:
                grad_b = grad_b.to(lora_B.dtype)
            grad_logits = None
            if grad_gates is not None:  # the gates are the softmax of the logits with the unselected at −∞
                grad_logits = torch._softmax_backward_data(grad_gates, gates, -1, gates.dtype)
            if grad_probs is not None and prob is not None:
                from_probs = torch._softmax_backward_data(grad_probs, prob, -1, prob.dtype)
                grad_logits = from_probs if grad_logits is None else grad_logits + from_probs
            if grad_codes is not None and keep is not None and ctx.keep_scale != 1.0:
                grad_codes = grad_codes * ctx.keep_scale  # dropout's scale, once on the codes' gradient
            x_drop = None
            if grad_codes is not None and needs[3]:
                x_drop = _dropped(x, keep, 1.0)
                grad_a = torch.mm(grad_codes.t(), x_drop.to(product)).to(lora_A.dtype)
            if needs[0]:
                if grad_codes is not None:
                    grad_x = torch.mm(grad_codes, a)
                    grad_x = grad_x.to(x.dtype) if grad_x.dtype != x.dtype else grad_x
                    grad_x = _dropped(grad_x, keep, 1.0)
                if grad_logits is not None:
                    from_router = torch.mm(grad_logits, router)
                    from_router = from_router if from_router.dtype == x.dtype else from_router.to(x.dtype)
                    grad_x = from_router if grad_x is None else grad_x + from_router
            if grad_logits is not None and needs[2]:
                x_r = x if x.dtype == r_dtype else x.to(r_dtype)
                grad_router = torch.mm(grad_logits.t(), x_r).to(router.dtype)
        return grad_x, grad_base, grad_router, grad_a, grad_b, *(None,) * 9


def _dropped(x: Tensor, keep: Tensor | None, keep_scale: float) -> Tensor:
    """x ⊙ keep, times ``keep_scale`` unless it is 1 (folded into the spread matrix)."""
    if keep is None:
        return x
    return x * keep if keep_scale == 1.0 else x * keep * keep_scale
