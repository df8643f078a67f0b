#!/usr/bin/env bash
# The GPU sweep of BENCHMARKS.md: LLaMA-2-7B-shaped layers (2 of 32, random weights) in bf16 on one CUDA GPU
# under bf16 autocast: ours vs PEFT LoRA vs the naive per-expert loop, eager and compiled, 2,048 and 8,192
# tokens a step, generation, parity against fp32, peak memory and host syncs per step. At most 8 minutes on
# one H100/H200 (FULL=1 adds the sweep without autocast, E in {4, 8, 16, 64}, and many codes: +6 min).
# Needs no network and no install of comoe: it runs from a checkout with the python that holds a CUDA
# torch, transformers >= 5, peft 0.21 and accelerate.
#   benchmarks/run_gpu.sh                    # results into benchmarks/results, then render BENCHMARKS.md
#   RESULTS=/some/dir benchmarks/run_gpu.sh  # elsewhere (the render step is skipped)
# Wheels in .whl/ (e.g. peft 0.21.2 and the transformers of the CPU results, for a machine whose image has
# others) are installed into a temporary folder first; where the carried transformers does not import with
# that machine's packages, its own is used (the result records which).
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE=$(mktemp -d)
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  if ! PYTHONPATH="$SITE" $PY -c "from transformers import LlamaForCausalLM; import peft" 2>/dev/null; then
    echo "the carried transformers does not import here; using this machine's" >&2
    rm -rf "$SITE"/transformers "$SITE"/transformers-*
  fi
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF'
import peft, torch, transformers
from torch.nn import functional as F
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"peft {peft.__version__}, F.grouped_mm: {hasattr(F, 'grouped_mm')}, "
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
EOF
BENCH="$PY -m comoe bench"
G="--size gpu7b --out $RESULTS"
# bf16 autocast (mixed precision, as `comoe train --bf16`): the way a GPU user trains; parity against fp32
V=base,lora,lora-dora,naive,ours-dense,ours-grouped,ours-con-gram,ours-dora
timeout 130 $BENCH $G --autocast bfloat16 --rank 16 --variants $V --gen-rounds 10 --name gpu7b-amp
# 4x the tokens per step (16 x 512): the adapters' fixed per-step cost against more base work
V=lora,ours-dense,ours-grouped,ours-con-gram
timeout 90 $BENCH $G --autocast bfloat16 --batch 16 --rank 16 --experts 4,16 --variants $V \
        --no-generate --no-parity --name gpu7b-amp-b16
# the same steps with every variant's decoder layers compiled (`comoe train --compile`), both token counts
V=lora,ours-dense,ours-con-gram
timeout 110 $BENCH $G --autocast bfloat16 --rank 16 --experts 4 --variants $V --compile \
        --name gpu7b-amp-compiled
timeout 80 $BENCH $G --autocast bfloat16 --batch 16 --rank 16 --experts 4 --variants $V --compile \
        --no-generate --name gpu7b-amp-b16-compiled
# where a step's time goes: GPU busy vs wall, kernels and host operators per step
timeout 60 $PY benchmarks/gpu_profile.py --out "$RESULTS/gpu-profile.json"
if [[ -n "${FULL:-}" ]]; then  # FULL=1: also the runs without autocast and the many-codes sweep (+6 min)
  timeout 240 $BENCH $G --rank 16 --gen-rounds 10
  V=lora,ours-dense,ours-grouped,ours-con-gram
  timeout 100 $BENCH $G --autocast bfloat16 --rank 64 --experts 16,64 --variants $V \
          --no-generate --no-parity --name gpu7b-amp-r64
fi
if [[ "$RESULTS" == benchmarks/results ]]; then
  $BENCH --render --out "$RESULTS" --markdown BENCHMARKS.md --notes benchmarks/NOTES.md
fi
