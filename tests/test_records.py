"""Routing records (``comoe.records``) as the layers feed them: expert outputs formed for the sampled tokens
only, the contrastive term of an evaluation forward from the outputs' cosines, top-p's sets."""

from __future__ import annotations

import pytest
import torch

from comoe import RoutingRecorder, get_comoe_model
from comoe.losses import stacked_info_nce
from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config

KINDS = {
    "lora": dict(),
    "dora": dict(use_dora=True),
    "ffn": dict(placement="ffn", target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    "topp": dict(routing="topp", top_p=0.6, top_k=3),
}


class TraceSizes(RoutingRecorder):
    """A recorder that also notes how many tokens' expert outputs each trace carried."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.sample_rows: list[int] = []

    def observe(self, trace, token_mask, task_ids, contrastive):
        if trace.samples is not None:
            self.sample_rows.append(trace.samples.outputs.shape[0])
        super().observe(trace, token_mask, task_ids, contrastive)


@pytest.mark.parametrize("kind", list(KINDS))
def test_expert_outputs_are_formed_for_the_sampled_tokens_only(kind):
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama", **KINDS[kind])).eval()
    randomize_adapters(model)
    inputs = batch("llama", batch_size=4, seq_len=16)
    with torch.no_grad(), model.recording(TraceSizes(sample_outputs=3)) as recorder:
        model(**inputs)
        model(**inputs)
    assert recorder.sample_rows and max(recorder.sample_rows) <= 3
    for name, record in recorder.records.items():
        outputs, _, chosen = record.outputs()
        assert outputs.shape[0] == 3, name  # filled by the first forward, nothing formed after
        routed = model.routed_modules[name]
        assert chosen.max() < routed.num_experts


@pytest.mark.parametrize("kind", ["dora", "ffn", "materialized"])
def test_an_evaluation_forward_records_the_contrastive_loss_a_training_forward_computes(kind):
    """Without autograd the layers keep their outputs' (N, E, E) cosines, not the (N, E, D) outputs: the
    recorded loss is the one a training forward computes from the outputs (anchors 'all', no dropout)."""
    overrides = {"materialized": dict(contrastive_form="materialized")}.get(kind, KINDS.get(kind, {}))
    config = tiny_comoe_config("llama", anchor="all", contrastive_weight=0.1, **overrides)
    model = get_comoe_model(build("llama"), config)
    randomize_adapters(model)
    inputs = batch("llama")
    model.train()
    trained = model(**inputs, labels=inputs["input_ids"]).contrastive_loss.detach()
    model.eval()
    with torch.no_grad(), model.recording(RoutingRecorder()) as recorder:
        model(**inputs)
    recorded = [
        m["contrastive_loss"] for m in recorder.summary().values() if m["contrastive_loss"] is not None
    ]
    torch.testing.assert_close(
        torch.tensor(recorded, dtype=torch.float64).mean(), trained.double(), rtol=1e-5, atol=1e-6
    )


def test_logged_cosines_under_top_p_count_selected_anchors_only():
    """One token with experts {0, 1} (a third slot unselected): 'all' anchors are 0 and 1; the logged
    positive cosine is cos(E0, E1) and the negatives are experts 2 and 3."""
    cos = torch.tensor(
        [[1.0, 0.5, 0.1, 0.2], [0.5, 1.0, 0.3, 0.4], [0.1, 0.3, 1.0, 0.0], [0.2, 0.4, 0.0, 1.0]]
    )
    anchors = torch.tensor([[0, 1, 2]])  # slots: 0, 1 selected; 2 not
    slot_mask = torch.tensor([[True, True, False]])
    cosines = cos[anchors[0]][None, None]  # (M=1, N=1, A=3, E=4)
    active = torch.tensor([[[True, True, False, False]]])
    out = stacked_info_nce(cosines, anchors[None], active, ~active, 0.1, 1e-3, None, slot_mask[None])
    torch.testing.assert_close(out.pos_cos, torch.tensor([0.5]))
    torch.testing.assert_close(out.neg_cos, torch.tensor([(0.1 + 0.2 + 0.3 + 0.4) / 4]))
