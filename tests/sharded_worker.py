"""One rank of the sharded-gradient check (``tests/test_contract.py``): a comoe model sharded over 2 CPU
processes (gloo), with torch's ``fully_shard`` on every decoder layer and the root (FSDP2) or with a
DeepSpeed ZeRO-3 engine (every tensor partitioned), one training forward and backward with the auxiliary
terms on, for each of several cases in one launch. Rank 0 also runs the unsharded model on the same inputs
and writes both sets of adapter gradients of every case."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist


def run(rank: int, world_size: int, port: int, out_path: str, cases: dict[str, dict]) -> None:
    os.environ.update(  # what a launcher sets (DeepSpeed reads LOCAL_RANK)
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results = {name: _run(rank, case) for name, case in cases.items()}
        if rank == 0:
            torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _run(rank: int, case: dict) -> dict | None:
    from torch.distributed.fsdp import fully_shard

    from comoe import get_comoe_model
    from tests.tiny_models import batch, build, randomize_adapters, tiny_comoe_config

    torch.set_num_threads(1)
    base = build("llama", num_layers=2)
    if case["base_dtype"] == "bfloat16":
        base = base.to(torch.bfloat16)  # adapters and routers stay fp32
    config = tiny_comoe_config("llama", **case["config"])
    model = get_comoe_model(base, config)
    randomize_adapters(model, seed=7)
    model.train()
    reference = copy.deepcopy(model) if rank == 0 else None
    inputs = batch("llama", seed=3, batch_size=2, seq_len=12, pad=3)  # the same on every rank
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    torch.manual_seed(11)
    if case.get("engine") == "zero3":
        sharded, out = _zero3_grads(model, inputs, labels)
    else:
        inner = model.base_model.model  # the transformers model
        for layer in inner.model.layers:
            fully_shard(layer)
        fully_shard(inner)
        out = model(**inputs, labels=labels)
        out.loss.backward()
        sharded = {
            name: param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
            for name, param in model.named_parameters()
            if param.grad is not None
        }
    contrastive = _detached(out.get("contrastive_loss"))
    if rank != 0:
        return None
    torch.manual_seed(11)
    ref_out = reference(**inputs, labels=labels)
    ref_out.loss.backward()
    single = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}
    return {
        "sharded": sharded,
        "single": single,
        "contrastive": (contrastive, _detached(ref_out.get("contrastive_loss"))),
    }


def _zero3_grads(model, inputs, labels) -> tuple[dict, object]:
    """The whole gradients of one ZeRO-3 forward and backward, as `comoe train` runs the engine."""
    from deepspeed.utils import safe_get_full_grad

    from comoe.training.zero import ZeroPlan, deepspeed_config, initialize

    trainable = [p for p in model.parameters() if p.requires_grad]
    plan = ZeroPlan(stage=3, extra={"stage3_param_persistence_threshold": 0})
    config = deepspeed_config(plan, micro_batch_size=2, grad_accum=1, max_grad_norm=None)
    engine = initialize(model, torch.optim.AdamW(trainable), config)
    out = engine(**inputs, labels=labels)
    engine.backward(out.loss)
    grads = {name: safe_get_full_grad(p) for name, p in model.named_parameters() if p.requires_grad}
    return {name: g for name, g in grads.items() if g is not None}, out


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


if __name__ == "__main__":  # pragma: no cover - started by tests/test_contract.py
    sys.exit("run through tests/test_contract.py")
