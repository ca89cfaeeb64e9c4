#!/usr/bin/env bash
# Check that tokenizers saved by olm load with the oldest transformers pyproject allows (4.46).
# Builds a side venv outside the repository with transformers 4.46 and the tokenizers it pins
# (no torch: AutoTokenizer does not need it), then runs the test that loads a tokenizer saved
# by olm_cli.modeling.save_tokenizer in that venv. Usage: bash scripts/check_tokenizer_floor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
FLOOR="${OLM_TF_FLOOR_VENV:-.venv-tf-floor}"
if [ ! -x "$FLOOR/bin/python" ]; then
  .venv/bin/python -m venv "$FLOOR"
  "$FLOOR/bin/pip" install --quiet "transformers==4.46.*"
fi
"$FLOOR/bin/python" -c "import transformers, tokenizers; print('floor venv:', '$FLOOR', 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__)"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OLM_TF_FLOOR_PYTHON="$FLOOR/bin/python"
.venv/bin/python -m pytest -q -rs tests/faults/test_messages_files.py -k "tokenizer"
