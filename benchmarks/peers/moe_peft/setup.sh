#!/usr/bin/env bash
# Build the MoE-PEFT peer environment (opt-in, not part of comoe's tests or CI). Idempotent.
#   bash benchmarks/peers/moe_peft/setup.sh
#   MOE_PEFT_VENV=/elsewhere bash benchmarks/peers/moe_peft/setup.sh   # default: next to this file, .venv/
#   TORCH_INDEX=https://download.pytorch.org/whl/cpu bash ...         # where no local CPU wheel is configured
# torch goes in first, alone, as the CPU build (TORCH_VERSION, default 2.13.0: the version comoe's tables used).
# MoE-PEFT 2.0.2 declares torch<2.6 and transformers<4.47: it is installed with --no-deps, and its runtime
# dependencies (requirements.txt) under a constraint that pins torch, so pip never replaces it.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${MOE_PEFT_VENV:-$HERE/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

"${PIP[@]}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "torch==$TORCH_VERSION"
"${PIP[@]}" -c "$CONSTRAINTS" -r "$HERE/requirements.txt"
"${PIP[@]}" --no-deps "moe-peft==2.0.2"

"$VENV/bin/python" - <<'PY'
from importlib.metadata import version
import torch, transformers, peft, moe_peft  # noqa: F401  (moe_peft asserts its own minimums on import)
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), torch.__version__
print("peer env ok:", ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "peft", "moe_peft")))
PY
