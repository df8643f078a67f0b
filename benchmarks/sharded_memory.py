"""Per-rank memory of the adapter and its optimizer state on 2 CPU processes over gloo, after one AdamW step
(so the optimizer state exists): DDP, FSDP2 (comoe.training.sharding) and DeepSpeed ZeRO-2 and ZeRO-3
(comoe.training.zero, the engine `comoe train` runs).

The figures are the bytes of the tensors each rank holds, read from the tensors themselves (exact, and
independent of the allocator): the adapter's parameters as they sit on the rank, their gradients, AdamW's
exp_avg and exp_avg_sq, and under ZeRO its fp32 master copy of the rank's partition (``master_bytes``; ZeRO
keeps one even of fp32 parameters). ZeRO-2 keeps whole parameters and frees its gradient partition at the
step; ZeRO-3 keeps the rank's partition of each parameter (``param.ds_tensor``; ``param.data`` is empty
outside a forward) and a persistent gradient partition. ZeRO-3 runs with
``stage3_param_persistence_threshold = 0``: DeepSpeed's default keeps every tensor under 1e5 elements whole
on each rank, which would be every adapter tensor here. ZeRO-3's reduce bucket (``reduce_bucket_bytes``,
``reduce_bucket_size`` elements, which comoe sets to the adapter's size) is reported apart and left out of
the total, as DDP's buckets are. The frozen base is counted apart.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sharded_memory.py  # writes results/sharded-memory.json
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "sharded-memory.json"
SHAPE = dict(hidden=512, intermediate=1376, layers=4, vocab=1024)
ADAPTER = dict(r=16, lora_alpha=32, num_experts=4, top_k=2, contrastive_weight=0.01)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODES = ("ddp", "fsdp2", "zero2", "zero3")
BATCH, SEQ, LR = 2, 32, 1e-4
TOTAL = "adapter_grad_optimizer_bytes"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def _model() -> nn.Module:
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


def _batch(rank: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, SHAPE["vocab"], (BATCH, SEQ), generator=torch.Generator().manual_seed(rank))
    return {"input_ids": ids, "labels": ids}


def _split(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    params = list(model.parameters())
    return [p for p in params if p.requires_grad], [p for p in params if not p.requires_grad]


def _torch_row(mode: str, model: nn.Module, rank: int) -> dict[str, int]:
    """DDP or FSDP2 with torch's AdamW: parameters, their .grad and AdamW's state as the rank holds them."""
    from comoe.training.sharding import FsdpPlan, shard_model

    if mode == "fsdp2":
        shard_model(model, FsdpPlan(), torch.device("cpu"))
        wrapped = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
    params, frozen = _split(model)
    optimizer = torch.optim.AdamW(params, lr=LR)
    wrapped(**_batch(rank)).loss.backward()
    optimizer.step()
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    return {
        "adapter_bytes": _bytes(params),
        "grad_bytes": _bytes(p.grad for p in params),
        "optimizer_bytes": _bytes(state),
        "frozen_base_bytes": _bytes(frozen),
    }


def _on_rank(params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The tensors a rank holds for ``params``: ``.data`` (whole under ZeRO-1/2, empty under ZeRO-3 outside
    a forward) and ZeRO-3's partition ``.ds_tensor``."""
    return [p.data for p in params] + [p.ds_tensor for p in params if hasattr(p, "ds_tensor")]


def _zero_grads(zero, params: list[nn.Parameter]) -> list[torch.Tensor]:
    """The gradient tensors ZeRO still holds: ZeRO-3's flat partition buffer (kept for the run), ZeRO-1/2's
    partition (freed at the step) and any ``.grad`` left on the module's parameters."""
    buffers = [getattr(zero, name, None) for name in ("grad_partitions_flat_buffer", "grads_in_partition")]
    averaged = [t for group in getattr(zero, "averaged_gradients", {}).values() if group for t in group]
    return [t for t in buffers if t is not None] + averaged + [p.grad for p in params if p.grad is not None]


def _reduce_buckets(zero) -> list[torch.Tensor]:
    buffers = [bucket.buffer for bucket in getattr(zero, "ipg_buckets", {}).values()]
    flat = [t for b in buffers for t in (b if isinstance(b, list) else [b])]
    return [t for t in flat if t is not None]


def _zero_row(stage: int, model: nn.Module, rank: int) -> dict[str, int]:
    """ZeRO-``stage`` through comoe's engine setup: module parameters as they sit on the rank, the fp32
    master partition, the gradients that survive the step, AdamW's state (keyed by the master partition)."""
    from comoe.training.zero import ZeroPlan, deepspeed_config, initialize

    params, frozen = _split(model)
    numel = sum(p.numel() for p in params)  # the buckets `comoe train` sizes to the adapter
    config = deepspeed_config(
        ZeroPlan(stage=stage), BATCH, grad_accum=1, max_grad_norm=None, trainable_numel=numel
    )
    if stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine = initialize(model, torch.optim.AdamW(params, lr=LR), config)
    engine.backward(engine(**_batch(rank)).loss)
    engine.step()
    zero = engine.optimizer
    flat = getattr(zero, "single_partition_of_fp32_groups", None)
    masters = list(flat if flat is not None else zero.fp32_partitioned_groups_flat)
    state = [t for m in masters for k, t in zero.optimizer.state[m].items() if k != "step"]
    return {
        "adapter_bytes": _bytes(_on_rank(params)),
        "master_bytes": _bytes(masters),
        "grad_bytes": _bytes(_zero_grads(zero, params)),
        "optimizer_bytes": _bytes(state),
        "frozen_base_bytes": _bytes(_on_rank(frozen)),
        "reduce_bucket_bytes": _bytes(_reduce_buckets(zero)),
    }


def _measure(rank: int, world: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["WORLD_SIZE"] = str(world)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    row = _zero_row(int(mode[-1]), model, rank) if mode.startswith("zero") else _torch_row(mode, model, rank)
    parts = ("adapter_bytes", "master_bytes", "grad_bytes", "optimizer_bytes")
    row[TOTAL] = sum(row.get(key, 0) for key in parts)
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
    import deepspeed

    from comoe.utils.files import write_json_atomic

    results = {}
    for mode in MODES:
        tmp = OUT.with_suffix(f".{mode}.tmp")
        mp.spawn(_measure, args=(2, _free_port(), mode, str(tmp)), nprocs=2, join=True)
        results[mode] = json.loads(tmp.read_text())
        tmp.unlink()
    ddp = results["ddp"][0][TOTAL]
    report = {
        "command": "OMP_NUM_THREADS=1 python benchmarks/sharded_memory.py",
        "what": "bytes each of 2 ranks holds after one AdamW step: adapter, its gradients, AdamW state "
        "(and ZeRO's fp32 master copy); base apart",
        "zero": {
            "deepspeed": deepspeed.__version__,
            "setup": "comoe.training.zero.deepspeed_config(ZeroPlan(stage)) + initialize, as `comoe train`",
            "master_bytes": "ZeRO's fp32 master partition, counted in the total",
            "stage3_param_persistence_threshold": "0 (default 1e5 would keep every adapter tensor whole)",
            "reduce_bucket_bytes": "ZeRO-3's gradient reduce bucket (reduce_bucket_size: the adapter's size), not in the total",
        },
        "model": {"family": "llama", **SHAPE, "base_dtype": "bfloat16"},
        "adapter": {**ADAPTER, "target_modules": TARGETS},
        "per_rank": results,
        **{f"{mode}_over_ddp": round(results[mode][0][TOTAL] / ddp, 4) for mode in MODES[1:]},
    }
    write_json_atomic(OUT, report)
    print(json.dumps({m: [r[TOTAL] for r in rows] for m, rows in results.items()}))
    print(", ".join(f"{mode} / DDP per rank: {report[f'{mode}_over_ddp']}" for mode in MODES[1:]))


if __name__ == "__main__":
    main()
