"""The op counter of `benchmarks/op_count.py`: every ATen operator a step dispatches, backward included."""

from __future__ import annotations

import torch

from comoe.tools.bench.op_count import OpCounter


def test_the_counter_sees_forward_and_backward_operators():
    weight = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(2, 4)
    with OpCounter() as forward:
        loss = (x @ weight.t()).sum()
    with OpCounter() as backward:
        loss.backward()
    assert forward.ops["aten.mm.default"] == 1 and forward.ops["aten.sum.default"] == 1
    assert backward.ops["aten.mm.default"] == 1  # the weight's gradient (x needs none)
    assert forward.total == sum(forward.ops.values()) >= 3


def test_a_decode_step_counts_the_router_and_gating_above_lora():
    """One greedy decode step: ours dispatches LoRA's operators plus the router's product, top-k, softmax
    and the gates' scatter, a handful per adapted module (16 on the 4-layer model)."""
    from comoe.tools.bench.op_count import count_decode_ops

    result = count_decode_ops(layers=4)
    assert result["variants"]["lora"]["modules"] == 16
    extra = result["extra_ops_per_module"]
    assert {"aten.topk.default", "aten._softmax.default", "aten.scatter.src"} <= set(extra)
    assert result["extra_per_module"] == 8.0  # the figure README.md and benchmarks/NOTES.md give
