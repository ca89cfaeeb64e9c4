"""Smoke test of scripts/bench_selectors.py: the real CLI end to end at toy sizes.

It checks the plumbing (every contender trains through the engine, both tables print, the
JSON holds every measurement), not the numbers: those need the full run on quiet cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_selectors.py"
KEYS = [
    "random(pf=1)",
    "random(pf=2)",
    "entropy(pf=2)",
    "loss(pf=2)",
    "gradnorm(pf=2)",
    "diversity(pf=2)",
    "coverage(pf=2)",
]


def _load_module():
    spec = importlib.util.spec_from_file_location("bench_selectors", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smoke_run_reports_every_contender(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--smoke",
            "--out",
            str(out),
            "--keep",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "## Cost per trained token" in proc.stdout
    assert "## Held-out loss on clean text" in proc.stdout
    result = json.loads(out.read_text())
    assert list(result["cost"]) == KEYS
    assert list(result["quality"]["contenders"]) == KEYS
    for key, cost in result["cost"].items():
        assert all(
            math.isfinite(v) and v > 0 for v in cost["wall_us_per_token"] + cost["cpu_us_per_token"]
        ), key
        assert (cost["verdict"] in ("PASS", "FAIL")) == (cost["target"] is not None), key
    assert result["cost"]["random(pf=1)"]["wall_median_ratio"] == 1.0
    for key, quality in result["quality"]["contenders"].items():
        for run in quality["runs"]:
            assert run["trained_tokens"] >= 0.98 * result["quality"]["budget_tokens"], key
            assert math.isfinite(run["eval_loss"]), key
            assert len(run["eval_by_domain"]) == 3  # code, prose, drama (or readme offline)
    stream = result["quality"]["streams"][0]
    assert 0.2 < stream["noise_documents"] / stream["documents"] < 0.4


def test_noisy_stream_mixes_the_three_kinds_and_keeps_duplicates_exact(tmp_path: Path) -> None:
    from olm_cli.modeling import train_tokenizer

    bench = _load_module()
    clean = [
        {"text": f"document number {i} says something about topic {i % 7}. " * 5, "domain": "prose"}
        for i in range(70)
    ]
    shard = tmp_path / "seed.jsonl"
    shard.write_text("".join(json.dumps(d) + "\n" for d in clean))
    tokenizer = train_tokenizer([shard], "text", 300, 100_000)
    info = bench.build_noisy_stream(
        clean, tmp_path / "stream", tokenizer, noise=0.3, seed=0, shards=2
    )
    records = [
        json.loads(line)
        for p in sorted((tmp_path / "stream").glob("*.jsonl"))
        for line in p.read_text().splitlines()
    ]
    assert len(records) == info["documents"] == 100
    kinds = [r["domain"] for r in records if r["domain"].startswith("noise")]
    assert len(kinds) == 30 and set(kinds) == {"noise-dup", "noise-soup", "noise-spam"}
    seen: set[str] = set()
    for record in records:
        if record["domain"] == "noise-dup":
            assert record["text"] in seen  # an exact copy of a document that came earlier
        elif not record["domain"].startswith("noise"):
            seen.add(record["text"])
    assert 0.15 < info["noise_token_share"] < 0.45
