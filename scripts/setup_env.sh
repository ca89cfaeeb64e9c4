#!/usr/bin/env bash
# Create (or reuse) .venv with olm and its test dependencies. Used by quickstart.sh and test.sh.
# torch is pinned so that pip takes the CPU build instead of a multi-GB CUDA one on machines
# without a GPU; install a CUDA build yourself first on GPU machines (pip keeps it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${OLM_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
