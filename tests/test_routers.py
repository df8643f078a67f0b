"""Routers (``comoe.routers``): the registry, and top-p (dynamic) routing end to end — the layer against a
per-token reference, the contrastive loss with sets of varying size, the balance loss, the records, and a
real training run through the command line."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from comoe import CoMoEConfig
from comoe.config import own_fields
from comoe.layer import CoMoELayer
from comoe.losses import load_balancing_loss
from comoe.records import RoutingRecorder
from comoe.routers import ROUTERS, TopPRouter
from comoe.trace import ForwardContext, LayerTrace
from tests.cli_runs import comoe_cli, read_log, tiny_run_flags
from tests.references import reference_contrastive, reference_route
from tests.tiny_models import contrastive_of_call

pytestmark = pytest.mark.usefixtures("single_thread")
TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_the_routing_choices_are_the_registry():
    assert set(ROUTERS) == {"topk", "soft", "topp"}
    assert "top_p" in own_fields()
    with pytest.raises(ValueError, match=r"routing must be one of \('topk', 'soft', 'topp'\)"):
        CoMoEConfig(routing="expert-choice")
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        CoMoEConfig(routing="topp", top_p=0.0)


def test_topp_takes_the_fewest_experts_whose_probabilities_reach_p():
    probs = torch.tensor([[0.6, 0.3, 0.08, 0.02], [0.3, 0.25, 0.25, 0.2], [0.05, 0.9, 0.03, 0.02]])
    router = TopPRouter(4, CoMoEConfig(num_experts=4, top_k=3, routing="topp", top_p=0.75))
    routing = router.select(probs.log())
    # token 0: 0.6 < 0.75, then 0.9 → {0, 1}; token 1: 0.3, 0.55, 0.8 → three (the cap); token 2: {1}
    assert routing.active(4).tolist() == [
        [True, True, False, False],
        [True, True, True, False],
        [False, True, False, False],
    ]
    torch.testing.assert_close(routing.gates[0], torch.tensor([0.6, 0.3, 0.0, 0.0]) / 0.9)
    torch.testing.assert_close(routing.gates[2], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(3))
    torch.testing.assert_close(routing.probs, probs)
    # each token's unit of assignment spread over its own set
    torch.testing.assert_close(routing.share()[1], torch.tensor([1 / 3, 1 / 3, 1 / 3, 0.0]))


def topp_layer(base, *, num_experts=5, top_k=3, top_p=0.6, r=4, path="dense", contrastive_weight=0.0, **kw):
    cfg = CoMoEConfig(
        r=r,
        lora_alpha=2.0 * r + 1.0,
        lora_dropout=0.0,
        num_experts=num_experts,
        top_k=top_k,
        routing="topp",
        top_p=top_p,
        expert_path=path,
        contrastive_weight=contrastive_weight,
        **kw,
    )
    layer = CoMoELayer(base, cfg, ForwardContext(), name="probe")
    for p in base.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.experts.comoe_B.copy_(torch.randn(layer.experts.comoe_B.shape, generator=gen) * 0.3)
        layer.router.comoe_router.copy_(torch.randn(layer.router.comoe_router.shape, generator=gen))
    return layer


@pytest.mark.parametrize("path", ["dense", "grouped"])
def test_topp_layer_matches_a_per_token_reference(path):
    """Output and every gradient against one token, one expert at a time; the sets really vary in size."""
    base = nn.Linear(16, 12)
    layer = topp_layer(base, path=path)
    x = torch.randn(40, 16)
    x_layer = x.clone().requires_grad_(True)
    y = layer(x_layer)
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    (y * weights).sum().backward()

    A = layer.experts.comoe_A.detach().clone().requires_grad_(True)
    B = layer.experts.comoe_B.detach().clone().requires_grad_(True)
    router = layer.router.comoe_router.detach().clone().requires_grad_(True)
    rows, sizes = [], set()
    for n in range(x.shape[0]):
        chosen, gates = reference_route(router, x[n], num_experts=5, top_k=3, routing="topp", top_p=0.6)
        sizes.add(len(chosen))
        out = base(x[n])
        for slot, i in enumerate(chosen):
            out = (
                out
                + gates[slot] * (B[:, i * 4 : (i + 1) * 4] @ (A[i * 4 : (i + 1) * 4] @ x[n])) * layer.scaling
            )
        rows.append(out)
    (torch.stack(rows) * weights).sum().backward()
    assert sizes == {1, 2, 3}  # one, two and the cap of three experts all occur
    torch.testing.assert_close(y, torch.stack(rows), **TOL)
    for mine, ref in (
        (layer.experts.comoe_A, A),
        (layer.experts.comoe_B, B),
        (layer.router.comoe_router, router),
    ):
        torch.testing.assert_close(mine.grad, ref.grad, **TOL)


@pytest.mark.parametrize("anchor", ["all", "random"])
def test_topp_contrastive_loss_counts_the_tokens_with_two_or_more_experts(anchor):
    """The selected experts are the positives, the rest the negatives; a token that took one expert has no
    positive and is left out of the mean (Algorithm 1 on the others)."""
    base = nn.Linear(16, 12)
    layer = topp_layer(base, contrastive_weight=0.1, anchor=anchor).train()
    x = torch.randn(40, 16)
    routing = layer.route(x)
    codes = (x @ layer.experts.comoe_A.t()).detach().requires_grad_(True)
    inputs = layer.experts._contrastive_inputs(codes, None)
    torch.manual_seed(3)
    mine = contrastive_of_call(layer, routing, inputs)
    mine.loss.backward()

    counts = routing.active(5).sum(-1)
    assert (counts == 1).any() and (counts >= 2).any()
    outputs = layer.experts.expert_outputs(codes.detach().view(40, 5, 4))
    keep = counts >= 2
    if anchor == "all":
        anchors = routing.selected[keep]  # the cap of 3 slots; unselected slots are masked below
        per_token = []
        for n in keep.nonzero().squeeze(1).tolist():
            chosen = routing.selected[n][routing.slot_mask[n]]
            negatives = ~routing.active(5)[n]
            per_token.append(
                reference_contrastive(
                    outputs[n : n + 1],
                    chosen[None],
                    chosen[None],
                    negatives[None],
                    temperature=0.1,
                    epsilon=1e-3,
                )
            )
        expected = torch.stack(per_token).mean()
        torch.testing.assert_close(mine.loss, expected, **TOL)
        assert anchors.shape[1] == 3
    assert torch.isfinite(mine.loss) and mine.loss > 0
    assert codes.grad.abs().sum() > 0 and torch.isfinite(codes.grad).all()


def test_topp_balance_loss_and_records_take_sets_of_every_size():
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.3, 0.5], [0.1, 0.1, 0.8]])
    router = TopPRouter(
        3, CoMoEConfig(num_experts=3, top_k=2, routing="topp", top_p=0.7, contrastive_weight=0)
    )
    routing = router.select(probs.log())  # sets {0, 1}, {2, 1}, {2}
    share = routing.share()
    torch.testing.assert_close(share.sum(-1), torch.ones(3))
    f = torch.tensor([0.5, 1.0, 1.5]) / 3
    torch.testing.assert_close(load_balancing_loss(probs, share=share), 3 * (f * probs.mean(0)).sum())

    recorder = RoutingRecorder(num_tasks=1, contrastive=False)
    recorder.observe(LayerTrace("probe", None, routing, None, None, False, False), None, None, None)
    summary = recorder.summary()["probe"]
    assert summary["counts"] == [[1.0, 2.0, 2.0]]
    counted = dict(zip(map(tuple, summary["combinations"]), summary["combination_counts"][0], strict=True))
    assert counted[(0, 1)] == 1 and counted[(1, 2)] == 1 and counted[(2,)] == 1 and sum(counted.values()) == 3


@pytest.mark.slow
def test_comoe_train_routing_topp_through_the_command_line(tiny_model_dir, tmp_path):
    """`comoe train --routing topp --top-p 0.6 --top-k 3`: trains (loss falls), records the setting, and
    `comoe analyze` reads its routing."""
    out = tmp_path / "run"
    flags = [*tiny_run_flags(tiny_model_dir), "--routing", "topp", "--top-p", "0.6", "--top-k", "3"]
    comoe_cli("train", *flags, "--max-steps", "6", "--eval-base", "false", "--output-dir", str(out))
    log = read_log(out)
    assert all(row["loss"] == row["loss"] for row in log)  # finite
    assert "routing: topp" in (out / "run_config.yaml").read_text()
    assert "top_p: 0.6" in (out / "run_config.yaml").read_text()
    comoe_cli("analyze", str(out), "--no-tsne", "--output-dir", str(tmp_path / "analysis"))
    assert any((tmp_path / "analysis").iterdir())
