"""``olm train`` run nightly from cron: new shards, changed shards, bad shards, overlapping runs,
signals and time budgets, end to end through the real command line.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    add_shard,
    assert_bit_identical,
    cli,
    last_step,
    latest,
    ledger,
    ledger_summary,
    make_recipe,
    reaped,
    spawn,
    trainer_state,
    wait_for,
    weights,
)

# End to end (training runs, real ``olm`` processes, signals): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

DOCS = 8  # small shards: a few steps each


def _train(recipe: Path, *overrides: str) -> dict[str, Any]:
    result = cli("train", "--config", recipe, "--json", *overrides)
    assert result.code == 0, result.text
    outcome = result.json()
    outcome["output"] = result.err  # with --json the human messages go to stderr
    outcome["result"] = result
    return outcome


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_new_shards_are_trained_by_the_next_run_and_only_those(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("alpha", 1)], docs=DOCS)
    run_dir = tmp_path / "run"

    first = _train(recipe)
    assert (first["status"], first["increment"]) == ("increment_complete", 1)
    after_first = ledger(run_dir)
    assert {name: (e["status"], e["increment"]) for name, e in after_first.items()} == {
        "00-alpha/shard-000.jsonl": ("done", 1),
        "00-alpha/shard-001.jsonl": ("done", 1),
    }
    assert sum(e["tokens"] for e in after_first.values()) == first["tokens"]

    # The next night: one new shard has landed.
    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)
    second = _train(recipe)
    assert (second["status"], second["increment"]) == ("increment_complete", 2)
    after_second = ledger(run_dir)
    assert after_second["01-beta/shard-000.jsonl"]["status"] == "done"
    assert after_second["01-beta/shard-000.jsonl"]["increment"] == 2
    assert after_second["01-beta/shard-000.jsonl"]["tokens"] == second["tokens"]
    for name, entry in after_first.items():  # the old shards were not touched again
        assert after_second[name] == entry
    increment_two = [row for row in _metrics(run_dir) if row["increment"] == 2]
    assert increment_two and {row["domain"] for row in increment_two} == {"beta"}
    assert json.loads((run_dir / "ledger.json").read_text())["increment"] == 2

    third = _train(recipe)
    assert third["status"] == "nothing_to_do"
    assert ledger(run_dir) == after_second


def test_shard_changed_after_training_is_reported_and_skipped(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    run_dir = tmp_path / "run"
    _train(recipe)
    trained = ledger(run_dir)["00-alpha/shard-000.jsonl"]

    changed = add_shard(tmp_path / "stream", "alpha", 0, docs=DOCS + 3)  # rewritten in place
    add_shard(tmp_path / "stream", "alpha", 1, docs=DOCS)
    outcome = _train(recipe)

    assert outcome["status"] == "increment_complete"
    assert f"{changed} changed after it was trained; skipped" in " ".join(outcome["output"].split())
    entries = ledger(run_dir)
    entry = entries["00-alpha/shard-000.jsonl"]
    assert entry["status"] == "changed"
    assert "content changed after training" in entry["reason"]
    assert entry["tokens"] == trained["tokens"] and entry["increment"] == 1  # not trained again
    assert entries["00-alpha/shard-001.jsonl"]["status"] == "done"
    assert entries["00-alpha/shard-001.jsonl"]["tokens"] == outcome["tokens"]

    # Reported again every night, still not trained.
    again = _train(recipe)
    assert again["status"] == "nothing_to_do"
    assert "changed after it was trained" in again["output"]
    status = cli("status", "--run", run_dir, "--json").json()
    assert status["shards"]["changed"] == 1 and status["shards"]["done"] == 1


def test_max_shards_per_increment(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("alpha", 1), ("beta", 0)], docs=DOCS,
                         run={"max_shards_per_increment": 2})
    run_dir = tmp_path / "run"

    first = _train(recipe)
    assert first["increment"] == 1
    assert {n: (s, i) for n, (s, _, i) in ledger_summary(run_dir).items()} == {
        "00-alpha/shard-000.jsonl": ("done", 1),
        "00-alpha/shard-001.jsonl": ("done", 1),
        "01-beta/shard-000.jsonl": ("pending", None),
    }
    second = _train(recipe)
    assert second["increment"] == 2
    assert ledger_summary(run_dir)["01-beta/shard-000.jsonl"][::2] == ("done", 2)
    assert _train(recipe)["status"] == "nothing_to_do"


def test_bad_shards_are_quarantined_and_the_rest_trains(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("alpha", 1)], docs=DOCS)
    folder = tmp_path / "stream" / "00-alpha"
    good = (folder / "shard-000.jsonl").read_text().splitlines()
    (folder / "bad-json.jsonl").write_text(f"{good[0]}\n{{\"text\": \"unterminated\n{good[1]}\n")
    (folder / "latin1.jsonl").write_bytes(f"{good[0]}\n{good[1]}\n".encode() + '{"text": "café"}\n'.encode("latin-1"))
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "binary.jsonl").write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\x1c\x9b")  # a zip header
    run_dir = tmp_path / "run"

    outcome = _train(recipe)

    assert outcome["status"] == "increment_complete" and outcome["exit_code"] == 0
    entries = ledger(run_dir)
    expected_reasons = {
        "00-alpha/bad-json.jsonl": f"{folder / 'bad-json.jsonl'}:2: malformed JSON",
        "00-alpha/latin1.jsonl": f"{folder / 'latin1.jsonl'}:3: not UTF-8",
        "00-alpha/empty.jsonl": f"{folder / 'empty.jsonl'}: empty shard",
        "00-alpha/binary.jsonl": f"{folder / 'binary.jsonl'}:1: binary data",
    }
    for name, reason in expected_reasons.items():
        entry = entries[name]
        assert entry["status"] == "quarantined", (name, entry)
        assert entry["reason"].startswith(reason), (name, entry["reason"])
        assert entry["tokens"] == 0
        assert f"quarantined: {entry['reason']}" in outcome["output"], outcome["output"]
    assert entries["00-alpha/shard-000.jsonl"]["status"] == entries["00-alpha/shard-001.jsonl"]["status"] == "done"
    assert sum(e["tokens"] for e in entries.values()) == outcome["tokens"]
    # Quarantine sticks until the file changes; it does not fail every night.
    assert _train(recipe)["status"] == "nothing_to_do"


def test_second_concurrent_run_exits_75_naming_the_holder(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("alpha", 1)], docs=24)
    run_dir = tmp_path / "run"
    lock = run_dir / ".lock"
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "first.log")) as first:
        wait_for(lambda: lock.exists() and lock.stat().st_size > 0, first, what="the first run's lock")

        second = cli("train", "--config", recipe)
        status = cli("status", "--run", run_dir, "--json").json()
        still_running = first.poll() is None
        first.kill()

    assert still_running, "the first run ended before the second one started; make it longer"
    assert second.code == 75, second.text
    assert second.has(f"pid {first.pid} on host {socket.gethostname()}"), second.text
    assert second.has("locked"), second.text
    assert status["lock"]["pid"] == first.pid and status["lock"]["host"] == socket.gethostname()


def test_stale_lock_from_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (run_dir / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                               "started": "2024-01-01T03:00:00+00:00", "command": "olm train"}))

    outcome = _train(recipe)

    assert outcome["status"] == "increment_complete"
    assert f"taking over stale lock from pid {pid}" in outcome["output"], outcome["output"]
    assert (run_dir / ".lock").read_text() == ""  # released cleanly this time
    assert cli("status", "--run", run_dir, "--json").json()["lock"] is None


def test_sigterm_checkpoints_exits_143_and_the_next_run_finishes_identically(tmp_path: Path) -> None:
    shards = [("alpha", 0), ("beta", 0)]
    reference = tmp_path / "reference"
    ref_outcome = _train(make_recipe(reference, shards=shards, docs=12))
    ref_weights = weights(latest(reference / "run"))

    recipe = make_recipe(tmp_path / "trial", shards=shards, docs=12)
    run_dir = tmp_path / "trial" / "run"
    log = tmp_path / "trial" / "train.log"
    with reaped(spawn("train", "--config", recipe, log=log)) as proc:
        wait_for(lambda: last_step(run_dir) >= 3, proc, what="step 3")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    output = log.read_text()
    assert proc.returncode == 143, output
    assert "stopped by signal" in output and "the next run continues" in output, output
    stopped = trainer_state(latest(run_dir))
    assert stopped["increment_complete"] is False
    assert 3 <= stopped["step"] < ref_outcome["steps"]
    assert stopped["global_step"] == last_step(run_dir)  # checkpointed at the step it stopped
    assert (run_dir / ".lock").read_text() == ""

    outcome = _train(recipe)
    assert (outcome["status"], outcome["increment"], outcome["steps"]) == ("increment_complete", 1, ref_outcome["steps"])
    assert_bit_identical(weights(latest(run_dir)), ref_weights)
    assert ledger_summary(run_dir) == ledger_summary(reference / "run")


def test_time_budget_stops_cleanly_and_the_next_run_continues(tmp_path: Path) -> None:
    # A budget shorter than start-up: the run still trains one step (every invocation makes
    # progress), then stops at that step boundary, whatever the machine's speed.
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("beta", 0)], docs=50,
                         run={"time_budget": 0.001, "checkpoint_every": 1000})
    run_dir = tmp_path / "run"

    first = _train(recipe)
    assert first["status"] == "time_budget" and first["exit_code"] == 0, first
    assert first["steps"] == 1
    assert "time budget reached" in first["message"]
    stopped = trainer_state(latest(run_dir))
    assert stopped["increment_complete"] is False and stopped["step"] == first["steps"]
    assert {s for s, _, _ in ledger_summary(run_dir).values()} <= {"in_progress", "pending", "done"}

    # The next invocation (here with more time) continues the same increment to its end.
    second = _train(recipe, "run.time_budget=600")
    assert (second["status"], second["increment"]) == ("increment_complete", 1)
    assert second["steps"] > first["steps"]
    steps = [row["step"] for row in _metrics(run_dir)]
    assert steps == list(range(1, second["steps"] + 1))
    assert {s for s, _, _ in ledger_summary(run_dir).values()} == {"done"}


def test_increment_ending_exactly_on_a_step_boundary_marks_its_last_shard_done(tmp_path: Path) -> None:
    """Regression: the stream used to hand out a shard's last block without reading past its end,
    so the shard stayed in_progress and the next night ran an empty increment to close it.

    min_block_tokens == block_size drops every shard tail; with one block per step the last step
    always takes exactly the last block. Nothing here depends on the tokenizer."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS,
                         data={"min_block_tokens": 32}, batch={"size": 1, "micro_batch": 1})
    run_dir = tmp_path / "run"

    first = _train(recipe)

    assert first["status"] == "increment_complete"
    assert ledger_summary(run_dir)["00-alpha/shard-000.jsonl"][::2] == ("done", 1)
    again = _train(recipe)
    assert again["status"] == "nothing_to_do", again
