"""Data left over when a step budget ends an increment is trained exactly once, in the next one."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import add_shard, tiny_recipe
from transformers import AutoTokenizer

from olm_cli.data import BlockStream, position_has_work, position_unread_shards
from olm_cli.increment import run_increment
from olm_cli.recipe import recipe_from_dict

PATTERN = r"(?:\d+-)?(?P<domain>[^/\\]+)[/\\][^/\\]+$"


def _ledger_tokens(run: Path) -> dict[str, int]:
    ledger = json.loads((run / "ledger.json").read_text())
    return {Path(e["path"]).name: e["tokens"] for e in ledger["shards"] if e["status"] == "done"}


def test_budget_cut_after_the_last_shard_was_read_carries_only_its_pending_blocks(tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0, docs=30)
    shard = next((tmp_path / "stream").rglob("*.jsonl"))

    # Reference: one pass over the shard; its tokenizer is what every run here trains.
    reference = recipe_from_dict(tiny_recipe(tmp_path, run={"dir": str(tmp_path / "ref")}))
    assert run_increment(reference).status == "increment_complete"
    full_tokens = _ledger_tokens(tmp_path / "ref")[shard.name]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "ref" / "checkpoints" / "latest")

    # With one block per step, stopping one step before the end leaves only the shard's tail:
    # the end-of-increment read-ahead hits the end of the file and the tail stays in the carry. That
    # shard must then not be planned again from its start.
    stream = BlockStream([shard], tokenizer, block_size=32, domain_pattern=PATTERN)
    blocks = stream.take(100_000)
    assert len(blocks[-1]) < 32, "the shard should end with a short tail block"
    cut = len(blocks) - 1

    one_block = {"size": 1, "micro_batch": 1}
    budget = recipe_from_dict(tiny_recipe(tmp_path, batch=one_block, run={"max_steps": cut}))
    first = run_increment(budget)
    assert first.steps == cut
    carried = json.loads((Path(first.checkpoint) / "trainer_state.json").read_text())["stream"]
    # The case under test: every shard read, only the tail (in the packer's carry) left.
    assert position_unread_shards(carried) == [] and position_has_work(carried)
    assert carried["unit"]["carry"] and not carried["unit"]["blocks"]
    one_pass = recipe_from_dict(tiny_recipe(tmp_path, batch=one_block))
    second = run_increment(one_pass)
    assert second.status == "increment_complete" and second.steps >= 1
    assert run_increment(one_pass).status == "nothing_to_do"
    assert _ledger_tokens(tmp_path / "run") == {shard.name: full_tokens}  # every token once
