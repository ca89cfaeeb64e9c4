#!/usr/bin/env bash
# olm quickstart: build a three-domain stream of real text offline, then train a tiny model
# from scratch through the domains as they "arrive" (one nightly run per domain), evaluate
# every domain after each increment, and show the continual-learning matrix.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1
OLM=.venv/bin/olm

echo "== building the demo data (stdlib code, stdlib docs, Shakespeare) into data/demo"
.venv/bin/python scripts/build_demo_data.py --out data/demo --shard-kb 140 --force

rm -rf data/stream runs/quickstart
for domain_dir in data/demo/train/*/; do
  name=$(basename "$domain_dir")
  echo
  echo "== new shards arrive: $name"
  mkdir -p "data/stream/$name"
  cp "$domain_dir"/*.jsonl "data/stream/$name/"
  $OLM train --config configs/quickstart.yaml
done

echo
echo "== a second run with no new shards does nothing"
$OLM train --config configs/quickstart.yaml

echo
$OLM eval --run runs/quickstart --matrix
$OLM status --run runs/quickstart
$OLM replay-inspect --run runs/quickstart --show 1
echo
echo "== the report (regenerated after every increment: eval.report): open runs/quickstart/report/index.html"
$OLM report --run runs/quickstart

echo
echo "== the release (what serving reads) is a plain transformers model"
.venv/bin/python - <<'PY'
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "runs/quickstart/releases/latest"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
ids = tokenizer("def ", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print(f"{sum(p.numel() for p in model.parameters()):,} parameters; greedy sample: {tokenizer.decode(out[0])!r}")
PY
