"""The method shards: torch's FSDP2 (``fully_shard`` per decoder layer and the root; 2 CPU processes, gloo)
trains a comoe model with the contrastive term on, and its adapter gradients equal one process's on the same
inputs. The contrastive loss needs BᵀB of every module: it is formed inside each layer's forward, while FSDP
holds the layer's weights whole."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests import fsdp_worker

pytestmark = pytest.mark.slow

CASES = {
    "lora-fp32": dict(base_dtype="float32", config=dict(anchor="all", balance_weight=0.01)),
    "lora-bf16": dict(base_dtype="bfloat16", config=dict(anchor="all", balance_weight=0.01)),
    "topp-fp32": dict(base_dtype="float32", config=dict(anchor="all", routing="topp", top_p=0.6, top_k=3)),
    "dora-fp32": dict(base_dtype="float32", config=dict(anchor="all", use_dora=True)),
    "ffn-fp32": dict(
        base_dtype="float32",
        config=dict(
            anchor="all", placement="ffn", target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    ),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp2_contrastive_gradients_equal_one_process(case, tmp_path):
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(fsdp_worker.run, args=(2, _free_port(), out_path, CASES[case]), nprocs=2, join=True)
    result = torch.load(out_path)
    sharded, single = result["sharded"], result["single"]
    assert sorted(sharded) == sorted(single)
    assert any("comoe_B" in name or "_B" in name for name in single)
    con_sharded, con_single = result["contrastive"]
    assert con_single > 0
    torch.testing.assert_close(con_sharded, con_single, rtol=1e-5, atol=1e-6)
    for name, grad in single.items():
        assert grad.abs().sum() > 0, f"{name}: no gradient reached it"
        torch.testing.assert_close(
            sharded[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}"
        )
