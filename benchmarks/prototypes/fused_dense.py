"""Prototype (not used by the library): the dense-codes expert path as ONE autograd Function.

Monkeypatches ``CoMoELayer.forward`` (written against src/comoe/layer.py as of this benchmark run: the
version whose forward leaves (layer, (codes, dora), probs, top_idx) in ``context.pending``, LoRA experts only). Same outputs and
gradients as the layer; saves x_drop, codes and gates for backward instead of also the gated codes.
Measured by ``measure.py``: less activation memory where E*r is comparable to the hidden size, no speed gain.
"""

import torch
from torch import Tensor

import comoe.layer as L


class DenseExperts(torch.autograd.Function):
    """delta = ((x A^T) * g_rep) B^T * scaling, and codes = x A^T, in one node.

    Saves x_drop, codes and gates (not the gated codes, not expanded gates). An fp32 prototype: under
    autocast its backward would mix dtypes (a library version would use torch.amp.custom_fwd/custom_bwd)."""

    @staticmethod
    def forward(ctx, x, A, B, gates, rank: int, scaling: float):
        codes = x @ A.t()  # (N, E*r)
        n, er = codes.shape
        gated = (codes.view(n, -1, rank) * gates.unsqueeze(-1)).view(n, er)
        delta = torch.mm(gated, B.t())
        if scaling != 1.0:
            delta.mul_(scaling)
        ctx.save_for_backward(x, A, B, codes, gates)
        ctx.rank, ctx.scaling = rank, scaling
        return delta, codes

    @staticmethod
    def backward(ctx, grad_delta, grad_codes_out):
        x, A, B, codes, gates = ctx.saved_tensors
        rank, scaling = ctx.rank, ctx.scaling
        n, er = codes.shape
        g_delta = grad_delta * scaling if scaling != 1.0 else grad_delta
        grad_gated = torch.mm(g_delta, B)  # (N, E*r)
        codes3 = codes.view(n, -1, rank)
        grad_gates = grad_b = grad_a = grad_x = None
        if ctx.needs_input_grad[3]:
            grad_gates = (grad_gated.view(n, -1, rank) * codes3).sum(-1)
        if ctx.needs_input_grad[2]:
            gated = (codes3 * gates.unsqueeze(-1)).view(n, er)
            grad_b = torch.mm(g_delta.t(), gated)
        grad_codes = (grad_gated.view(n, -1, rank) * gates.unsqueeze(-1)).view(n, er)
        if grad_codes_out is not None:
            grad_codes = grad_codes + grad_codes_out
        if ctx.needs_input_grad[1]:
            grad_a = torch.mm(grad_codes.t(), x)
        if ctx.needs_input_grad[0]:
            grad_x = torch.mm(grad_codes, A)
        return grad_x, grad_a, grad_b, grad_gates, None, None


def fast_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """layer.py's current forward with the dense branch replaced by DenseExperts (scaling folded in)."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disabled:
        return result
    lead_shape = x.shape[:-1]
    x_flat = x.reshape(-1, self.in_features).to(self.comoe_A.dtype)
    probs, top_idx, gates = self.route(x_flat)
    x_drop = self.dropout(x_flat)
    ctx = self.context
    codes_with_grad = self._has_contrastive() and self.training and self.config.contrastive_weight > 0
    codes = None
    if self.expert_path == "dense":
        delta, codes = DenseExperts.apply(
            x_drop, self.comoe_A, self.comoe_B, gates.to(x_drop.dtype), self.r, self.scaling
        )
    else:
        if codes_with_grad:
            codes = x_drop @ self.comoe_A.t()
        delta = self._grouped_delta(x_drop, top_idx, gates, codes, self.comoe_B) * self.scaling
    if self._wants_aux():
        recorder = ctx.recorder
        wants_codes = (ctx.compute_contrastive and self._has_contrastive()) or (
            recorder is not None and recorder.wants_codes(self.module_name)
        )
        if codes is None and wants_codes:
            with torch.no_grad():
                codes = x_drop @ self.comoe_A.t()
        self._leave_pending(None if codes is None else (codes, None), probs, top_idx)
    return result + delta.view(*lead_shape, self.out_features).to(result.dtype)


ORIGINAL_FORWARD = L.CoMoELayer.forward


def patch():
    L.CoMoELayer.forward = fast_forward


def unpatch():
    L.CoMoELayer.forward = ORIGINAL_FORWARD
