"""2,000 tiny shards trained end to end by a real ``olm`` process: no per-shard overhead worth a
timeout, every token counted to its shard, and a one-pass schedule (no budget) that ends at its floor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import make_documents, tiny_recipe, write_jsonl
from e2e_helpers import ledger, olm

pytestmark = pytest.mark.slow

SHARDS = 2000


def test_two_thousand_tiny_shards_train_with_exact_ledger_and_schedule(tmp_path: Path) -> None:
    for i in range(SHARDS):
        write_jsonl(tmp_path / "stream" / "00-alpha" / f"s{i:05d}.jsonl", make_documents("alpha", 1, i))
    recipe = tiny_recipe(tmp_path, batch={"size": 32, "micro_batch": 32},
                         optim={"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 2},
                         run={"checkpoint_every": 10_000})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")

    result = olm("train", "--config", path, "--json", timeout=300)  # a guard against a hang, not a speed target

    assert result.code == 0, result.text
    outcome = json.loads(result.out)
    entries = ledger(tmp_path / "run")
    assert len(entries) == SHARDS and {e["status"] for e in entries.values()} == {"done"}
    # Blocks cross shards (a shard is ~70 tokens, a block 32): each token is counted once, to its shard.
    assert sum(e["tokens"] for e in entries.values()) == outcome["tokens"]
    assert all(e["tokens"] > 0 for e in entries.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == outcome["steps"]
    assert rows[-1]["lr"] == pytest.approx(1e-3 * 0.1, rel=1e-3)  # the estimated cosine ends with the data
