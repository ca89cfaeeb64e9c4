"""collect_status/render_status over a real run directory."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from olm_cli.errors import OlmError
from olm_cli.rundir.checkpoint import CheckpointManager
from olm_cli.rundir.ledger import ShardLedger
from olm_cli.rundir.lock import RunLock
from olm_cli.rundir.status import collect_status, last_json_line, render_status


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run directory after one increment: two shards done, one pending, one checkpoint."""
    run = tmp_path / "run"
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b", "c"):
        (data / f"{name}.txt").write_text(name * 10)
    ledger = ShardLedger(run / "ledger.json")
    ledger.scan(sorted(data.iterdir()))
    inc = ledger.start_increment()
    for name in ("a", "b"):
        ledger.mark_done(data / f"{name}.txt", 500, inc)
    manager = CheckpointManager(run / "checkpoints")
    manager.save(40, lambda directory: (directory / "trainer_state.json").write_text(json.dumps({"ledger": ledger.state_dict()})))
    ledger.save()
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 3.0 - s / 100}) + "\n" for s in range(1, 41))
    )
    (run / "eval").mkdir()
    (run / "eval" / "history.jsonl").write_text(json.dumps(EVAL_ROW) + "\n")
    return run

# What the engine appends to eval/history.jsonl after an increment.
EVAL_ROW = {"increment": 2, "step": 40, "trained": "code",
            "domains": {"code": {"loss": 2.5, "perplexity": 12.18, "tokens": 100}}}


def test_collect_status(run_dir: Path):
    status = collect_status(run_dir)
    assert status["increments"] == 1
    assert status["shards"]["done"] == 2 and status["shards"]["pending"] == 1
    assert status["tokens_trained"] == 1000
    assert status["last_checkpoint"]["step"] == 40
    assert status["last_checkpoint"]["path"].endswith("step-00000040")
    assert status["last_checkpoint"]["created"]
    assert status["last_eval"] == EVAL_ROW
    assert status["last_metrics"] == {"step": 40, "loss": 2.6}
    assert status["lock"] is None
    assert status["problems"] == []
    json.dumps(status)  # --json prints it as is


def test_status_shows_lock_holder(run_dir: Path):
    with RunLock(run_dir, command="olm train --config r.yaml"):
        status = collect_status(run_dir)
    assert status["lock"]["pid"] == os.getpid()
    assert status["lock"]["command"] == "olm train --config r.yaml"


def test_status_reports_problems_instead_of_failing(run_dir: Path):
    (run_dir / "ledger.json").write_text("{")
    os.truncate(run_dir / "checkpoints" / "step-00000040" / "trainer_state.json", 1)
    status = collect_status(run_dir)
    assert status["last_checkpoint"] is None
    assert any("ledger.json is corrupt" in p for p in status["problems"])
    assert any("step-00000040 is unusable" in p for p in status["problems"])


def test_empty_run_dir(tmp_path: Path):
    status = collect_status(tmp_path)
    assert status["increments"] == 0 and status["tokens_trained"] == 0
    assert status["last_checkpoint"] is None and status["last_eval"] is None
    assert status["last_metrics"] is None


def test_missing_run_dir_is_an_olm_error(tmp_path: Path):
    with pytest.raises(OlmError, match=str(tmp_path / "nope")):
        collect_status(tmp_path / "nope")


def test_render_status(run_dir: Path):
    buffer = io.StringIO()
    render_status(collect_status(run_dir), Console(file=buffer, width=200))
    text = buffer.getvalue()
    assert "idle" in text and "step 40" in text
    assert "done 2" in text and "pending 1" in text and "1,000" in text
    assert "after increment 2 (step 40)" in text and "code 2.5000" in text


def test_last_json_line_skips_torn_tail_and_reads_long_files(tmp_path: Path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps({"step": i, "pad": "x" * 50}) for i in range(2000)]
    path.write_text("\n".join(lines) + '\n{"step": 2000, "lo')  # writer killed mid-line
    assert last_json_line(path)["step"] == 1999
    huge = tmp_path / "one.jsonl"
    huge.write_text(json.dumps({"blob": "y" * 50_000}) + "\n")
    assert len(last_json_line(huge)["blob"]) == 50_000
    assert last_json_line(tmp_path / "absent.jsonl") is None
    (tmp_path / "empty.jsonl").write_text("")
    assert last_json_line(tmp_path / "empty.jsonl") is None
