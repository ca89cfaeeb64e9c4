"""Two processes reading disjoint lanes of the stream (torchrun + gloo, CPU) train what one process trains.

One process with ``data.lanes: 2`` reads both lanes itself; two processes (``data.lanes: auto``,
one lane each) read one lane each and exchange the blocks. The global batches are the same, so
the final weights agree within the bound of tests/test_distributed.py (the gradients are summed
in another order) and the ledgers are identical. The harness (launch, kill -9) is that file's.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import assert_bit_identical, latest, ledger_summary, weights
from test_distributed import _assert_close, _kill_two_ranks_mid_increment, _olm, _train
from test_distributed import pytestmark as distributed_marks

from olm_cli.data import assign_lanes

pytestmark = distributed_marks

# Shards of two domains and unequal sizes, split into two lanes of two shards each by bytes.
SHARDS = [("alpha", 0, 12), ("beta", 1, 10), ("alpha", 2, 8), ("beta", 3, 5)]


def _recipe(root: Path, run: str, **data: Any) -> Path:
    recipe = tiny_recipe(root, replay={"policy": "reservoir", "capacity": 50, "ratio": 0.25},
                         selector={"name": "entropy", "pool_factor": 2, "score_micro_batch": 2})
    recipe["data"].update(data)
    recipe["run"].update(dir=str(root / run), async_checkpoint=False)
    return write_recipe(root, recipe, f"{run}.yaml")


def _shards(root: Path) -> None:
    for domain, index, docs in SHARDS:
        add_shard(root / "stream", domain, index, docs=docs)


def _reading(stdout: str) -> dict[int, tuple[str, int]]:
    """``{rank: (lanes, shards)}`` from the line rank 0 prints at the end of the increment."""
    line = next(line for line in stdout.splitlines() if line.startswith("data read in"))
    return {int(rank): (lanes, int(shards))
            for rank, lanes, shards in re.findall(r"rank (\d+): (no lane|lanes? [\d,]+), (\d+) shard", line)}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process reading two lanes, and two processes reading one each, trained once."""
    root = tmp_path_factory.mktemp("lanes")
    _shards(root)
    one = _train(_olm(_recipe(root, "single", lanes=2)), root)
    assert one.returncode == 0, one.stderr
    two = _train(_olm(_recipe(root, "ddp"), processes=2), root)
    assert two.returncode == 0, two.stderr + two.stdout
    (root / "ddp.out").write_text(two.stdout)
    return root


def test_two_processes_reading_disjoint_lanes_match_one_process(root: Path) -> None:
    _assert_close(root / "ddp", root / "single")
    assert ledger_summary(root / "ddp") == ledger_summary(root / "single")
    assert [status for status, _, _ in ledger_summary(root / "ddp").values()] == ["done"] * len(SHARDS)
    # Each rank read one lane, two shards of the four: nobody read the whole stream.
    assert _reading((root / "ddp.out").read_text()) == {0: ("lane 0", 2), 1: ("lane 1", 2)}
    state = json.loads((latest(root / "ddp") / "trainer_state.json").read_text())["stream"]
    assert len(state["lanes"]) == 2
    expected = assign_lanes(sorted((root / "stream").rglob("*.jsonl")), 2)  # by bytes: two shards each here
    assert [lane["shards"] for lane in state["lanes"]] == expected


def test_ddp_with_lanes_kill_9_mid_increment_resumes_bit_identically(root: Path, tmp_path: Path) -> None:
    _shards(tmp_path)
    recipe = _recipe(tmp_path, "run")
    _kill_two_ranks_mid_increment(recipe, tmp_path, tmp_path / "run")
    killed = json.loads((latest(tmp_path / "run") / "trainer_state.json").read_text())
    assert killed["increment_complete"] is False and len(killed["stream"]["lanes"]) == 2
    # The same checkpoint continued by one process: it reads both lanes, the sequence is the same.
    shutil.copytree(tmp_path / "run", tmp_path / "one", symlinks=True)

    resumed = _train(_olm(recipe, processes=2), tmp_path)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resuming increment 1" in resumed.stdout
    assert_bit_identical(weights(latest(tmp_path / "run")), weights(latest(root / "ddp")))
    assert list(ledger_summary(tmp_path / "run").values()) == list(ledger_summary(root / "ddp").values())

    alone = _train(_olm(_recipe(tmp_path, "one")), tmp_path)
    assert alone.returncode == 0, alone.stderr + alone.stdout
    assert "resuming increment 1" in alone.stdout
    _assert_close(tmp_path / "one", root / "ddp")
    assert list(ledger_summary(tmp_path / "one").values()) == list(ledger_summary(root / "ddp").values())
