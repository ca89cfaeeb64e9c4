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
# Headless Chromium renders olm report's page in tests/test_report.py (Debian package `chromium`).
# Without apt (or root) it cannot be installed here and that test is skipped with its reason.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
  apt() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -y -q "$@" >/dev/null 2>&1; }
  if ! { apt install chromium || { apt update && apt install chromium; }; }; then
    echo "warning: could not install chromium; the report's browser test will be skipped" >&2
  fi
fi
.venv/bin/ruff check olm_cli tests scripts
.venv/bin/mypy  # configured in pyproject.toml: olm_cli, with the pydantic plugin
.venv/bin/python -m pytest -q "$@"
