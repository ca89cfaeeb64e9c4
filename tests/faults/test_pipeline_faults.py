"""The training stream's pipeline end to end (olm_cli/pipeline.py): kill -9 with the shuffle
buffer on resumes bit-identically, a stop ends the read-ahead worker without a hang, and a
buffer left by a step budget is trained by the next increment with an exact ledger.

(tests/test_resume.py covers kill -9 with the recipe default, read-ahead on, shuffle off.)
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import (
    assert_bit_identical,
    cli,
    last_step,
    latest,
    ledger_summary,
    make_recipe,
    reaped,
    spawn,
    trainer_state,
    wait_for,
    weights,
)

pytestmark = pytest.mark.slow

SHUFFLED = {
    "data": {"shuffle_buffer": 12, "prefetch": 2},
    "replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 48},
    "run": {"checkpoint_every": 3, "keep_checkpoints": 2},
}
SHARDS = [("alpha", 0), ("beta", 0), ("alpha", 1)]


def _recipe(root: Path, **overrides: dict[str, Any]) -> Path:
    sections = {name: {**values, **overrides.get(name, {})} for name, values in SHUFFLED.items()}
    for name, values in overrides.items():
        sections.setdefault(name, values)
    return make_recipe(root, shards=SHARDS, docs=10, **sections)


def _train(recipe: Path) -> dict[str, Any]:
    result = cli("train", "--config", recipe, "--json")
    assert result.code == 0, result.text
    return result.json()


def _metrics(run_dir: Path) -> list[tuple[Any, ...]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows]


def test_kill_9_with_the_shuffle_buffer_on_resumes_bit_identically(tmp_path: Path) -> None:
    reference_root = tmp_path / "reference"
    reference = _train(_recipe(reference_root))
    assert reference["status"] == "increment_complete" and reference["steps"] >= 10
    ref_run = reference_root / "run"
    plain_root = tmp_path / "plain"
    _train(_recipe(plain_root, data={"shuffle_buffer": 0}))
    assert _metrics(plain_root / "run") != _metrics(ref_run), "the buffer changed nothing"

    root = tmp_path / "killed"
    recipe = _recipe(root)
    run_dir = root / "run"
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "killed.log")) as proc:
        wait_for(lambda: last_step(run_dir) >= 7, proc, what="step 7")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # The checkpoint the rerun starts from holds the buffer: arrays in parts, a count in the JSON.
    saved = trainer_state(latest(run_dir))["stream"]
    assert saved["shuffle"]["buffered"] > 0 and saved["shuffle"]["tokens"] is None
    assert (latest(run_dir) / "parts.safetensors").is_file()
    for _ in range(3):
        if _train(recipe)["status"] in ("increment_complete", "nothing_to_do"):
            break
    assert_bit_identical(weights(latest(run_dir)), weights(latest(ref_run)))
    assert _metrics(run_dir) == _metrics(ref_run)
    assert ledger_summary(run_dir) == ledger_summary(ref_run)
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}


def test_sigterm_with_read_ahead_stops_promptly_and_the_rerun_finishes(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, data={"prefetch": 8})
    run_dir = tmp_path / "run"
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "stopped.log")) as proc:
        wait_for(lambda: last_step(run_dir) >= 2, proc, what="step 2")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # a worker that did not stop would hang here
    assert proc.returncode == 143, (tmp_path / "stopped.log").read_text()
    assert _train(recipe)["status"] == "increment_complete"
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}


def test_a_buffer_left_by_a_step_budget_is_trained_next_time(tmp_path: Path) -> None:
    plain_root = tmp_path / "plain"
    _train(_recipe(plain_root, data={"shuffle_buffer": 0}, replay={"ratio": 0.0}))
    all_tokens = sum(tokens for _, tokens, _ in ledger_summary(plain_root / "run").values())

    recipe = _recipe(tmp_path, data={"shuffle_buffer": 64}, replay={"ratio": 0.0}, run={"max_steps": 4})
    run_dir = tmp_path / "run"
    first = _train(recipe)
    assert first["status"] == "increment_complete"
    left = trainer_state(latest(run_dir))["stream"]["shuffle"]["buffered"]
    assert left > 0, "the budget should end with blocks in the buffer"
    for _ in range(12):  # increments of 4 steps until the buffer and the shards are trained
        if _train(recipe)["status"] == "nothing_to_do":
            break
    summary = ledger_summary(run_dir)
    assert {status for status, _, _ in summary.values()} == {"done"}
    assert sum(tokens for _, tokens, _ in summary.values()) == all_tokens  # every token once, none lost
