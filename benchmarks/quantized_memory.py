"""Memory of a CoMoE training run on SmolLM2-135M with a bitsandbytes-quantised base (nf4, int8) against fp32.

    .venv/bin/python benchmarks/quantized_memory.py [--steps 10] [--batch 8] [--seq 128] [--out FILE.json]

Each variant runs in its own process, because peak resident memory (what the machine must have) is a
per-process figure: load the base (from comoe's SmolLM2 cache), wrap it with the default CoMoEConfig
(4 experts, top-2, r = 16 on q/k/v/o, λ = 0.01), run ``--steps`` AdamW steps on random tokens. Reported
per variant: the base's weight footprint (transformers' ``get_memory_footprint``, exact), the resident
memory once the model is built, the peak resident memory during the training steps (Linux: the peak is
reset through /proc/self/clear_refs after loading, so loading does not count), and the mean step time;
the ratios are to fp32. Step times come from separate processes on a shared machine: read them as rough.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

VARIANTS = (None, "nf4", "int8")


def rss_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def measure(quantize: str | None, steps: int, batch: int, seq: int) -> dict:
    import torch

    from comoe import CoMoEConfig, get_comoe_model
    from comoe.training.base_models import load_base_model

    torch.manual_seed(0)
    base, _ = load_base_model("smollm2-135m", quantize=quantize)
    footprint = base.get_memory_footprint()
    model = get_comoe_model(base, CoMoEConfig()).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(3, base.config.vocab_size, (batch, seq))
    built = rss_mb("VmRSS")
    reset_peak_rss()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {
        "quantize": quantize or "fp32",
        "weights_mb": footprint / 2**20,
        "rss_built_mb": built,
        "peak_rss_mb": rss_mb("VmHWM"),
        "step_s": sum(times[1:]) / max(len(times) - 1, 1),  # the first step warms up
        "last_loss": out.loss.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    parser.add_argument(
        "--variant", default=None, help=argparse.SUPPRESS
    )  # internal: one variant, print JSON
    args = parser.parse_args()
    if args.variant is not None:
        quantize = None if args.variant == "fp32" else args.variant
        print(json.dumps(measure(quantize, args.steps, args.batch, args.seq)))
        return
    rows = []
    for quantize in VARIANTS:
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            quantize or "fp32",
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ref = rows[0]
    print(
        f"SmolLM2-135M, CoMoE default adapter, batch {args.batch} × {args.seq} tokens, {args.steps} AdamW steps, CPU"
    )
    print(
        "| base | weights (MB) | ratio | RSS built (MB) | ratio | training peak RSS (MB) | ratio | step (s) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['quantize']} | {row['weights_mb']:.0f} | {row['weights_mb'] / ref['weights_mb']:.2f}× "
            f"| {row['rss_built_mb']:.0f} | {row['rss_built_mb'] / ref['rss_built_mb']:.2f}× "
            f"| {row['peak_rss_mb']:.0f} | {row['peak_rss_mb'] / ref['peak_rss_mb']:.2f}× "
            f"| {row['step_s']:.2f} | {row['step_s'] / ref['step_s']:.2f}× |"
        )
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
