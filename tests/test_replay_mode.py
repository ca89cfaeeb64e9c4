"""``replay.mode``: replay added on top of an increment's data, or displacing part of it.

With ``displace`` an increment without a budget takes as many steps as its new data alone would
(the same compute as training without replay); the new data that replayed samples displaced is
carried to the next increment, and every token is still trained exactly once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import cli, ledger_summary, make_recipe

pytestmark = pytest.mark.slow

SHARDS = [("alpha", 0), ("alpha", 1)]
REPLAY = {"policy": "reservoir", "ratio": 0.5, "capacity": 64}


def _train_until_nothing_to_do(recipe: Path) -> list[dict[str, Any]]:
    outcomes = []
    for _ in range(10):
        result = cli("train", "--config", recipe, "--json")
        assert result.code == 0, result.text
        outcomes.append(result.json())
        if outcomes[-1]["status"] == "nothing_to_do":
            return outcomes[:-1]
    raise AssertionError(f"still training after 10 runs: {outcomes}")


def test_displace_keeps_the_step_budget_and_carries_the_rest_without_losing_a_token(tmp_path: Path) -> None:
    runs = {}
    for name, replay in (("naive", {}), ("add", REPLAY), ("displace", {**REPLAY, "mode": "displace"})):
        root = tmp_path / name
        runs[name] = (_train_until_nothing_to_do(make_recipe(root, shards=SHARDS, docs=12, replay=replay)),
                      ledger_summary(root / "run"))
    naive, add, displace = (runs[name][0] for name in ("naive", "add", "displace"))

    assert len(naive) == 1
    # add: every new block plus replay on top, so twice the steps at ratio 0.5.
    assert len(add) == 1 and add[0]["steps"] >= 2 * naive[0]["steps"] - 1
    # displace: the first increment costs what training on its new data alone costs...
    assert (displace[0]["steps"], displace[0]["tokens"]) == (naive[0]["steps"], naive[0]["tokens"])
    # ...and the displaced half is carried to the next increments (no new shard arrived).
    assert len(displace) > 1 and all(o["status"] == "increment_complete" and o["steps"] > 0 for o in displace)
    # Every token trained exactly once, whichever way replay shared the batches.
    tokens = {name: {shard: entry[:2] for shard, entry in runs[name][1].items()} for name in runs}
    assert tokens["displace"] == tokens["naive"] == tokens["add"]
    assert {status for status, _ in tokens["displace"].values()} == {"done"}
