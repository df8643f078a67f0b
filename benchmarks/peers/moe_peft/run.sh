#!/usr/bin/env bash
# The MoE-PEFT peer comparison, end to end (opt-in, not in CI; ~15 min on one shared CPU core):
#   bash benchmarks/peers/moe_peft/run.sh                 # setup, tiny, wide, smollm2, then BENCHMARKS.md
#   STEPS=10 SIZES="tiny wide" bash benchmarks/peers/moe_peft/run.sh
# Each size writes benchmarks/results/peer-moe-peft-<size>.json; `comoe bench --render` (comoe's own venv)
# then puts them in BENCHMARKS.md's "Peers" section beside comoe's ratios for the same size.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../.." && pwd)"
VENV="${MOE_PEFT_VENV:-$HERE/.venv}"
OUT="${OUT:-benchmarks/results}"
STEPS="${STEPS:-20}"
cd "$ROOT"
bash "$HERE/setup.sh"
export OMP_NUM_THREADS=1
for size in ${SIZES:-tiny wide smollm2}; do
  "$VENV/bin/python" "$HERE/bench.py" --size "$size" --steps "$STEPS" --out "$OUT"
done
if [[ -x .venv/bin/comoe ]]; then
  .venv/bin/comoe bench --render --out "$OUT" --markdown BENCHMARKS.md --notes benchmarks/NOTES.md
else
  echo "comoe's venv (.venv) not found: render with  comoe bench --render --out $OUT --markdown BENCHMARKS.md --notes benchmarks/NOTES.md"
fi
