#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check olm_cli tests scripts
.venv/bin/python -m pytest -q "$@"
