"""scripts/bench_lanes.py end to end on a few small shards: real processes, the lanes split the work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_lanes_splits_the_reading_between_two_processes() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_lanes.py"), "--shards", "6", "--docs", "8",
                          "--block-size", "64", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    one, = report["worlds"]["1"]["ranks"]
    two = report["worlds"]["2"]["ranks"]
    assert one["own_shards"] == 6 and [r["own_shards"] for r in two] == [3, 3]
    # Every token is read once, by one rank; every rank receives the whole sequence.
    assert sum(r["own_tokens"] for r in two) >= one["own_tokens"] - 2 * 64  # up to a dropped tail per lane
    assert two[0]["blocks_received"] == two[1]["blocks_received"] >= one["blocks_received"]
    assert report["worlds"]["2"]["busiest_rank_cpu_s"] > 0
