"""Operators per training step, per adapted module, against PEFT LoRA (``comoe.tools.bench.op_count``).

Every ATen operator that a training step's forward and backward dispatch (the optimizer step left out),
counted on the CPU with a ``TorchDispatchMode``: PEFT LoRA, ours at λ = 0 (dense path) and ours with the
contrastive term (Gram form), on a 4-layer tiny Llama with q/k/v/o adapted (16 modules), E = 4, top-2:

    .venv/bin/python benchmarks/op_count.py --out benchmarks/results/op-count.json
    .venv/bin/python benchmarks/op_count.py --decode --out benchmarks/results/op-count-decode.json

``--decode`` counts one greedy decode step instead (eval mode, KV cache): LoRA and ours, per module.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import subprocess

from comoe.tools.bench.op_count import count_decode_ops, count_ops, op_count_table
from comoe.utils.files import write_json_atomic
from comoe.utils.machine import machine_info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--ranks", default="8,16", help="comma list")
    parser.add_argument("--decode", action="store_true", help="count one greedy decode step instead")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    ranks = tuple(int(r) for r in args.ranks.split(","))
    if args.decode:
        result = count_decode_ops(layers=args.layers, experts=args.experts, rank=ranks[-1])
    else:
        result = count_ops(layers=args.layers, experts=args.experts, ranks=ranks)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    import torch

    result = {
        "command": "python benchmarks/op_count.py "
        + " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in vars(args).items() if v),
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "commit": commit.strip(),
        "machine": machine_info(torch.device("cpu")),
        **result,
    }
    if args.decode:
        print(f"decode step: ours {result['extra_per_module']:+.1f} operators per adapted module above LoRA")
        print("\n".join(f"  {op}: {n:+.2f}" for op, n in result["extra_ops_per_module"].items()))
    else:
        print("\n".join(op_count_table(result)))
    if args.out:
        write_json_atomic(args.out, result, indent=1)


if __name__ == "__main__":
    main()
