"""Per-rank memory of the adapter and its optimizer state: FSDP2 (comoe.training.sharding) against DDP, 2
CPU processes over gloo, after one AdamW step (so the optimizer state exists).

The figures are the bytes of the tensors each rank holds (adapter parameters, their gradients, AdamW's
exp_avg and exp_avg_sq): exact, and independent of the allocator. The frozen base is counted apart.

    .venv/bin/python benchmarks/sharded_memory.py   # writes benchmarks/results/sharded-memory.json
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sharded-memory.json"
SHAPE = dict(hidden=512, intermediate=1376, layers=4, vocab=1024)
ADAPTER = dict(r=16, lora_alpha=32, num_experts=4, top_k=2, contrastive_weight=0.01)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    from comoe import CoMoEConfig, get_comoe_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=SHAPE["vocab"],
        hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=128,
    )
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    return get_comoe_model(base, CoMoEConfig(target_modules=TARGETS, **ADAPTER))


def _measure(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from comoe.training.sharding import FsdpPlan, shard_model

    model = _model()
    if mode == "fsdp2":
        shard_model(model, FsdpPlan(), torch.device("cpu"))
        wrapped = model
    else:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(1, SHAPE["vocab"], (2, 32), generator=torch.Generator().manual_seed(rank))
    wrapped(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    row = {
        "adapter_bytes": _bytes(params),
        "grad_bytes": _bytes(p.grad for p in params),
        "optimizer_bytes": _bytes(state),
        "frozen_base_bytes": _bytes(frozen),
    }
    row["adapter_grad_optimizer_bytes"] = row["adapter_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]
    rows = [None] * world
    dist.all_gather_object(rows, row)
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from comoe.utils.files import write_json_atomic

    results = {}
    for mode in ("ddp", "fsdp2"):
        tmp = OUT.with_suffix(f".{mode}.tmp")
        mp.spawn(_measure, args=(2, _free_port(), mode, str(tmp)), nprocs=2, join=True)
        results[mode] = json.loads(tmp.read_text())
        tmp.unlink()
    ddp, fsdp = (results[m][0]["adapter_grad_optimizer_bytes"] for m in ("ddp", "fsdp2"))
    report = {
        "command": "python benchmarks/sharded_memory.py",
        "what": "bytes each of 2 ranks holds after one AdamW step: adapter, its gradients, AdamW state; base apart",
        "model": {"family": "llama", **SHAPE, "base_dtype": "bfloat16"},
        "adapter": {**ADAPTER, "target_modules": TARGETS},
        "per_rank": results,
        "fsdp2_over_ddp": round(fsdp / ddp, 4),
    }
    write_json_atomic(OUT, report)
    print(json.dumps({m: [r["adapter_grad_optimizer_bytes"] for r in rows] for m, rows in results.items()}))
    print(f"FSDP2 / DDP per rank: {report['fsdp2_over_ddp']}")


if __name__ == "__main__":
    main()
