#!/usr/bin/env bash
# The project's test command (README "Tests"; .ci/run calls exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The oldest transformers pyproject allows, in a side venv without torch, so that a test loads a
# tokenizer saved by olm with it (tests/faults/test_messages_files.py). Without a package index
# the venv cannot be built and that one test is skipped with its reason.
FLOOR="${OLM_TF_FLOOR_VENV:-.venv-tf-floor}"
if [ ! -x "$FLOOR/bin/python" ]; then
  if ! { python3 -m venv "$FLOOR" && "$FLOOR/bin/pip" install -q --disable-pip-version-check "transformers==4.46.*"; }; then
    echo "warning: could not build $FLOOR; the transformers-floor tokenizer test will be skipped" >&2
    rm -rf "$FLOOR"
  fi
fi
export OLM_TF_FLOOR_PYTHON="$PWD/$FLOOR/bin/python"
.venv/bin/ruff check olm_cli tests scripts
.venv/bin/mypy  # configured in pyproject.toml: olm_cli, with the pydantic plugin
.venv/bin/python -m pytest -q "$@"
