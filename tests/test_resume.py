"""Crash safety of ``olm train`` end to end: kill -9 anywhere, a corrupt checkpoint, a full
disk, a diverging loss.

The promise under test (docs/run-directory.md): everything needed to continue lives in the run
directory, so a run killed at any moment and simply re-invoked ends with *bit-identical*
weights and the same shard ledger as a run that was never interrupted.
"""

from __future__ import annotations

import errno
import json
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_helpers import (
    add_shard,
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

from olm_cli import checkpoint_snapshot
from olm_cli.rundir import CheckpointManager

# End to end (training runs, kill -9 of real processes): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

# One recipe exercises both kinds of strategy state: a reservoir replay buffer (on disk, with
# its own RNG) supplies a quarter of every batch, and the entropy selector scores a pool twice
# the size of the new-data share and keeps the top half.
STATEFUL = {
    "replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 48},
    "selector": {"name": "entropy", "pool_factor": 2},
    "run": {"checkpoint_every": 3, "keep_checkpoints": 2},
}
SHARDS = [("alpha", 0), ("beta", 0)]
DOCS = 12  # about 18 optimizer steps over the two shards
# Seeded so that a failure names a reproducible kill point.
KILL_SEED = 1789
KILL_TRIALS = 3


def _stateful_recipe(root: Path) -> Path:
    return make_recipe(root, shards=SHARDS, docs=DOCS, **STATEFUL)


def _metric_rows(run_dir: Path) -> list[tuple[Any, ...]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["tokens"], r["domain"], r["replayed"]) for r in rows]


def _train_until_complete(recipe: Path, max_runs: int = 4) -> list[dict[str, Any]]:
    """Re-invoke ``olm train`` the way cron would until the increment is reported complete."""
    outcomes = []
    for _ in range(max_runs):
        result = cli("train", "--config", recipe, "--json")
        assert result.code == 0, result.text
        outcomes.append(result.json())
        # nothing_to_do: the kill came after the final checkpoint was published.
        if outcomes[-1]["status"] in ("increment_complete", "nothing_to_do"):
            return outcomes
    raise AssertionError(f"increment not complete after {max_runs} runs: {outcomes}")


def _snapshot(run_dir: Path) -> dict[str, Any]:
    final = latest(run_dir)
    return {
        "weights": weights(final),
        "ledger": ledger_summary(run_dir),
        "state": trainer_state(final),
        "metrics": _metric_rows(run_dir),
    }


def _assert_same_run(run_dir: Path, ref: dict[str, Any], context: str) -> None:
    got = _snapshot(run_dir)
    try:
        assert_bit_identical(got["weights"], ref["weights"])
    except AssertionError as exc:
        raise AssertionError(f"{context}: {exc}") from None
    assert got["ledger"] == ref["ledger"], context
    for key in ("increment", "increment_complete", "global_step", "total_tokens", "step", "tokens", "domain_tokens"):
        assert got["state"][key] == ref["state"][key], (context, key)
    # Metric lines written after the checkpoint a run resumed from are dropped and re-done.
    assert got["metrics"] == ref["metrics"], context
    assert not list((run_dir / "checkpoints").glob(".tmp-*")), context


def _kill_point(trial: int, steps: int) -> tuple[str, float]:
    """Trial 0 kills a seeded delay after the run took its lock: while it imports, builds the
    model and trains the tokenizer, before any checkpoint exists. The others kill once
    ``metrics.jsonl`` reaches a seeded random step, which lands mid-step, mid-checkpoint or
    between the two, wherever the child happens to be (never so late that it may finish first)."""
    rng = random.Random(f"{KILL_SEED}-{trial}")
    if trial == 0:
        return "setup", round(rng.uniform(0.0, 2.5), 2)
    return "step", rng.randrange(2, steps - 3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same recipe trained without interruption."""
    root = tmp_path_factory.mktemp("reference")
    outcome = cli("train", "--config", _stateful_recipe(root), "--json")
    assert outcome.code == 0, outcome.text
    ref = _snapshot(root / "run")
    ref["steps"] = outcome.json()["steps"]
    assert ref["steps"] >= 12, "the increment should be long enough to kill it in many places"
    assert {status for status, _, _ in ref["ledger"].values()} == {"done"}
    assert any(row[5] for row in ref["metrics"]), "replay never supplied a sample"
    return ref


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_kill_9_at_random_point_then_rerun_is_bit_identical(tmp_path: Path, reference: dict[str, Any],
                                                           trial: int) -> None:
    kind, where = _kill_point(trial, reference["steps"])
    recipe = _stateful_recipe(tmp_path)
    run_dir = tmp_path / "run"
    log = tmp_path / "killed.log"
    with reaped(spawn("train", "--config", recipe, log=log)) as proc:
        if kind == "setup":
            lock = run_dir / ".lock"
            wait_for(lambda: lock.exists() and lock.stat().st_size > 0, proc, what="the run lock")
            time.sleep(where)
        else:
            wait_for(lambda: last_step(run_dir) >= where, proc, what=f"step {where}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {log.read_text()}"
    context = f"kill -9 at {kind} {where} (metrics had reached step {last_step(run_dir)})"

    _train_until_complete(recipe)
    _assert_same_run(run_dir, reference, context)


def test_corrupt_latest_checkpoint_falls_back_to_previous_and_finishes(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12, run={"checkpoint_every": 3})
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    ref = _snapshot(run_dir)
    broken = latest(run_dir)
    previous = CheckpointManager(run_dir / "checkpoints").list()[-2]
    model_file = broken / "model.safetensors"
    with open(model_file, "r+b") as handle:
        handle.truncate(model_file.stat().st_size // 2)

    result = cli("train", "--config", recipe, "--json")

    assert result.code == 0, result.text
    assert result.has(f"checkpoint {broken.name} is unusable"), result.text
    assert result.has(f"falling back to {previous.name}"), result.text
    assert result.json()["status"] == "increment_complete"
    # The increment is finished again from the older checkpoint, to the very same weights.
    _assert_same_run(run_dir, ref, "after falling back")
    CheckpointManager(run_dir / "checkpoints").verify(latest(run_dir), deep=True)


@pytest.mark.parametrize("async_checkpoint", [True, False])
def test_full_disk_during_checkpoint_keeps_previous_checkpoint(tmp_path: Path, monkeypatch,
                                                               async_checkpoint: bool) -> None:
    """Synchronous or in the background (reported at the next checkpoint), the same one-line error."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12,
                         run={"checkpoint_every": 3, "async_checkpoint": async_checkpoint})
    run_dir = tmp_path / "run"
    real_save = checkpoint_snapshot.save_optimizer_state
    saves: list[Path] = []

    def save_until_disk_full(directory: Path, state: Any) -> None:
        saves.append(directory)
        if len(saves) >= 2:  # the first checkpoint fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(directory, state)

    monkeypatch.setattr(checkpoint_snapshot, "save_optimizer_state", save_until_disk_full)
    result = cli("train", "--config", recipe)
    monkeypatch.undo()

    assert result.code == 1, result.text
    assert result.has("could not write checkpoint step-00000006"), result.text
    assert result.has("No space left on device"), result.text
    checkpoints = CheckpointManager(run_dir / "checkpoints")
    assert [p.name for p in checkpoints.list()] == ["step-00000003"]
    assert latest(run_dir).name == "step-00000003"
    checkpoints.verify(latest(run_dir), deep=True)
    assert not [p.name for p in checkpoints.root.iterdir() if p.name.startswith(".")]
    assert trainer_state(latest(run_dir))["step"] == 3

    # Space freed: the next run resumes from step 3 and finishes the increment.
    again = cli("train", "--config", recipe, "--json")
    assert again.code == 0, again.text
    assert again.json()["status"] == "increment_complete"
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}


def test_crash_before_first_checkpoint_leaves_no_duplicate_metric_lines(tmp_path: Path, monkeypatch) -> None:
    """Regression: metrics.jsonl was truncated only when resuming an interrupted increment, so a
    run that died before its first checkpoint left lines the rerun wrote again."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=8, run={"checkpoint_every": 3})
    run_dir = tmp_path / "run"

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_snapshot, "save_optimizer_state", disk_full)
    # Steps 1-3 logged, no checkpoint; the step-3 write failed in the background and was
    # reported at the next checkpoint or the end, so a few more steps may be logged.
    assert cli("train", "--config", recipe).code == 1
    monkeypatch.undo()
    assert last_step(run_dir) >= 3 and not CheckpointManager(run_dir / "checkpoints").list()

    assert cli("train", "--config", recipe).code == 0
    steps = [row[0] for row in _metric_rows(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), steps


def test_nan_loss_skips_steps_then_stops_with_latest_checkpoint_untouched(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=8)
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    good = latest(run_dir)
    manifest = (good / "MANIFEST.json").read_text()
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    add_shard(tmp_path / "stream", "beta", 0, docs=8)

    # One step at lr 1e30 sends the weights to ~1e29; every forward after that overflows.
    result = cli("train", "--config", recipe, "optim.lr=1e30", "run.max_bad_steps=3")

    assert result.code == 1, result.text
    # The first step at lr 1e30 has a finite loss and a NaN gradient: it must never be applied.
    assert result.text.count("batch skipped") == 3, result.text
    assert result.has("batch skipped (3/3)"), result.text
    assert result.has("loss or gradients were NaN/Inf for 3 consecutive steps"), result.text
    assert result.has(f"rolled back to {good.name}"), result.text
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert latest(run_dir) == good
    assert (good / "MANIFEST.json").read_text() == manifest
    CheckpointManager(run_dir / "checkpoints").verify(good, deep=True)
    assert all(torch.isfinite(t).all() for t in weights(good).values())
    assert ledger_summary(run_dir)["01-beta/shard-000.jsonl"][0] != "done"
