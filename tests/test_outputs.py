"""The auxiliary losses are fields of the output's own type, so wrappers that rebuild a ModelOutput from its
fields keep them: torch's pytree, and DDP with ``find_unused_parameters`` (what Trainer sets for PEFT
models), which rebuilds the output through it."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils import _pytree as pytree
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

from comoe import get_comoe_model
from comoe.outputs import AUX_FIELDS, output_type_with_aux, with_aux_fields
from tests.tiny_models import batch, build, tiny_comoe_config

pytestmark = pytest.mark.usefixtures("single_thread")


def training_output(model):
    model.train()
    inputs = batch("llama")
    return model(**inputs, labels=inputs["input_ids"])


def test_a_training_output_keeps_its_losses_through_pytree():
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama", contrastive_weight=0.1))
    out = training_output(model)
    assert isinstance(out, CausalLMOutputWithPast)
    leaves, spec = pytree.tree_flatten(out)
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is type(out) and list(back.keys()) == list(out.keys())
    for key in ("loss", "aux_loss", "contrastive_loss"):
        assert back[key] is out[key] and getattr(back, key) is out[key]


def test_a_type_with_the_fields_is_kept_and_one_without_gets_them_once():
    assert output_type_with_aux(MoeCausalLMOutputWithPast) is not MoeCausalLMOutputWithPast  # aux_loss only
    assert output_type_with_aux(CausalLMOutputWithPast) is output_type_with_aux(CausalLMOutputWithPast)
    made = output_type_with_aux(CausalLMOutputWithPast)
    assert output_type_with_aux(made) is made and set(AUX_FIELDS) <= set(made.__dataclass_fields__)
    plain = with_aux_fields({"logits": 1}, {"aux_loss": torch.tensor(2.0)})  # a dict stays a dict
    assert type(plain) is dict and plain["aux_loss"] == 2


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_with_find_unused_parameters_keeps_the_losses_and_trains_them(one_process_group):
    model = get_comoe_model(build("llama"), tiny_comoe_config("llama", contrastive_weight=0.1))
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    out = training_output(ddp)
    assert out.aux_loss is not None and out.contrastive_loss > 0
    out.loss.backward()
    grads = [p.grad for name, p in model.named_parameters() if name.endswith("comoe_B")]  # B = 0: A gets none
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
