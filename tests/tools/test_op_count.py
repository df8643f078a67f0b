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
