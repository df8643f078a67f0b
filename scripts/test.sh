#!/usr/bin/env bash
# Sets up (idempotent), checks formatting and lint, and runs the whole test suite, as CI does.
# Arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev]"  # pytest, ruff and the optional extras
LINTED="src tests scripts examples benchmarks"
.venv/bin/ruff format --check $LINTED
.venv/bin/ruff check $LINTED
exec .venv/bin/python -m pytest "$@"
