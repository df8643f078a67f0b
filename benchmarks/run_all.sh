#!/usr/bin/env bash
# Reproduce every table of BENCHMARKS.md (CPU), then regenerate it from the JSON results.
#   benchmarks/run_all.sh            # all CPU runs + render   (≈ 10-15 min on 2 shared cores)
#   GPU=1 benchmarks/run_all.sh      # also benchmarks/run_gpu.sh, the LLaMA-2-7B-shaped CUDA runs (needs a GPU)
#   RENDER_ONLY=1 benchmarks/run_all.sh
# `python -m comoe bench ARGS` and `comoe bench ARGS` are the same command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
BENCH="python -m comoe bench"

if [[ -z "${RENDER_ONLY:-}" ]]; then
  # tiny: ours vs the naive per-expert loop (overhead regime), plus the torch.compile check
  $BENCH --size tiny --compile-check --out "$OUT"
  # hidden 1024: ours vs PEFT LoRA, contrastive overhead, activation memory, generate
  $BENCH --size wide --out "$OUT"
  # hidden 1024: contrastive overhead as E grows 4 -> 16 (Gram form vs the paper's materialised outputs)
  $BENCH --size wide --experts 4,16 --variants ours-dense,ours-con-gram,ours-con-mat \
         --no-generate --no-parity --name wide-experts --out "$OUT"
  # hidden 1024, E = 16 on a 4x larger batch: the Gram matrix B^T B is paid once per step, not per token
  $BENCH --size wide --experts 16 --batch 8 --variants ours-dense,ours-con-gram \
         --no-generate --no-parity --name wide-e16-1k --out "$OUT"
  # hidden 1024 in bf16: each path's error against an fp32 copy of the same model, beside PEFT LoRA's
  $BENCH --size wide --dtype bfloat16 --variants lora,naive,ours-dense,ours-grouped --no-memory \
         --no-generate --name wide-bf16-parity --out "$OUT"
  # SmolLM2-135M (real weights when the offline package is installed); 15 generate rounds: 5 were noisy
  $BENCH --size smollm2 --gen-rounds 15 --out "$OUT"
  # DoRA experts (CoMoE-DoRA) vs PEFT LoRA, PEFT's DoRA and LoRA experts: step time and saved activations
  $BENCH --size smollm2 --variants lora,lora-dora,ours-dense,ours-dora,ours-dora-con \
         --no-generate --no-parity --name smollm2-dora --out "$OUT"
  $BENCH --size wide --variants lora,lora-dora,ours-dense,ours-dora,ours-dora-con \
         --no-generate --no-parity --name wide-dora --out "$OUT"
  # whole-FFN experts (MixLoRA's layout) vs PEFT LoRA and LoRA experts on the same gate/up/down projections
  $BENCH --size smollm2 --target-modules gate_proj,up_proj,down_proj \
         --variants lora,ours-dense,ours-ffn,ours-ffn-con --no-generate --no-parity --name smollm2-ffn --out "$OUT"
  $BENCH --size wide --target-modules gate_proj,up_proj,down_proj \
         --variants lora,ours-dense,ours-ffn,ours-ffn-con --no-generate --no-parity --name wide-ffn --out "$OUT"
  # operators per training step and adapted module against PEFT LoRA (a count, not a time)
  python benchmarks/op_count.py --out "$OUT/op-count.json"
  if [[ -n "${GPU:-}" ]]; then
    # LLaMA-2-7B-shaped layers on a CUDA GPU, with and without bf16 autocast: peak memory and host syncs too
    RESULTS="$OUT" PYTHON=python benchmarks/run_gpu.sh
  fi
fi
$BENCH --render --out "$OUT" --markdown BENCHMARKS.md --notes benchmarks/NOTES.md
