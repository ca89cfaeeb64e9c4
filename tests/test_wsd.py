"""``optim.schedule: wsd`` and ``release.merge: sma`` end to end through ``olm train``.

The promises (docs/forgetting.md): the trunk trains at a constant rate through every increment
and is what the next increment starts from; the release is its cooldown branch (or the average
of its last checkpoints); a run killed mid-cooldown finishes it, on the next invocation, with
bit-identical weights.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_helpers import (
    add_shard,
    assert_bit_identical,
    cli,
    latest,
    make_recipe,
    reaped,
    spawn,
    wait_for,
    weights,
)

from olm_cli.rundir import CheckpointManager

pytestmark = pytest.mark.slow

LR = 1e-3


def _wsd(fraction: float, **extra: dict[str, Any]) -> dict[str, dict[str, Any]]:
    sections: dict[str, dict[str, Any]] = {
        "optim": {"schedule": "wsd", "lr": LR, "warmup_steps": 2, "cooldown_fraction": fraction},
        "replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 48},
        "run": {"checkpoint_every": 3},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return sections


def _release(run_dir: Path, increment: int) -> dict[str, torch.Tensor]:
    return weights(run_dir / "releases" / f"release-{increment:04d}")


def _two_increments(root: Path, recipe: Path) -> dict[str, Any]:
    run_dir = root / "run"
    first = cli("train", "--config", recipe, "--json")
    assert first.code == 0, first.text
    trunk1, release1 = weights(latest(run_dir)), _release(run_dir, 1)
    add_shard(root / "stream", "beta", 0, docs=12)
    second = cli("train", "--config", recipe, "--json")
    assert second.code == 0, second.text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"trunk1": trunk1, "release1": release1, "trunk2": weights(latest(run_dir)),
            "release2": _release(run_dir, 2), "rows": rows, "text": first.text + second.text}


def _differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[name], b[name]) for name in a)


def test_release_is_the_cooled_branch_and_the_next_increment_starts_from_the_trunk(tmp_path: Path) -> None:
    runs = {}
    for fraction in (0.25, 1.0):
        root = tmp_path / f"cooldown-{fraction}"
        recipe = make_recipe(root, shards=[("alpha", 0)], docs=12, **_wsd(fraction))
        runs[fraction] = _two_increments(root, recipe)
    short, long = runs[0.25], runs[1.0]

    # The trunk never sees its cooldown: the same trunk whatever the branch did.
    assert_bit_identical(short["trunk1"], long["trunk1"])
    assert_bit_identical(short["trunk2"], long["trunk2"])
    # What is released is the branch: not the trunk, and it depends on the cooldown's length.
    assert _differs(short["release1"], short["trunk1"])
    assert _differs(short["release1"], long["release1"])
    assert _differs(short["release2"], short["trunk2"])
    # Warm-up once per run directory; a constant rate through both increments (no re-warm, no decay).
    rates = [(row["increment"], row["lr"]) for row in short["rows"] if row.get("phase") is None]  # the trunk's lines
    assert {lr for inc, lr in rates} == {LR}
    assert {inc for inc, _ in rates} == {1, 2}
    assert "cooldown of increment 2" in short["text"] and "continues from trunk" in short["text"]
    history = [json.loads(line) for line in (tmp_path / "cooldown-0.25" / "run" / "cooldown-history.jsonl").open()]
    assert [(h["increment"], h["step"] == h["steps"] > 0, h["tokens"] > 0) for h in history] == [(1, True, True),
                                                                                               (2, True, True)]
    assert not (tmp_path / "cooldown-0.25" / "run" / "cooldown").exists()  # removed once released


def test_kill_9_mid_cooldown_then_rerun_releases_bit_identical_weights(tmp_path: Path) -> None:
    sections = _wsd(1.0, run={"checkpoint_every": 2})
    ref_root, root = tmp_path / "reference", tmp_path / "killed"
    reference = _two_increments(ref_root, make_recipe(ref_root, shards=[("alpha", 0), ("alpha", 1)], **sections))

    recipe = make_recipe(root, shards=[("alpha", 0), ("alpha", 1)], **sections)
    run_dir = root / "run"
    cooldown = CheckpointManager(run_dir / "cooldown")
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "killed.log")) as proc:
        wait_for(lambda: bool(cooldown.list()), proc, what="the first cooldown checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "finished before the kill"
    assert not (run_dir / "releases" / "release-0001").exists()

    rerun = cli("train", "--config", recipe, "--json")
    assert rerun.code == 0, rerun.text
    assert "finishing its cooldown" in rerun.text and "resuming at step" in rerun.text, rerun.text
    assert_bit_identical(_release(run_dir, 1), reference["release1"])
    # The next increment continues from the trunk exactly as the uninterrupted run did.
    add_shard(root / "stream", "beta", 0, docs=12)
    assert cli("train", "--config", recipe).code == 0
    assert_bit_identical(weights(latest(run_dir)), reference["trunk2"])
    assert_bit_identical(_release(run_dir, 2), reference["release2"])


def test_sma_release_is_the_average_of_the_last_trunk_checkpoints(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12,
                         optim={"schedule": "constant", "warmup_steps": 2},
                         release={"merge": "sma", "merge_last": 3}, run={"checkpoint_every": 2, "keep_checkpoints": 3})
    run_dir = tmp_path / "run"
    result = cli("train", "--config", recipe)
    assert result.code == 0, result.text
    kept = CheckpointManager(run_dir / "checkpoints").list()
    assert len(kept) == 3
    trunk = [weights(path) for path in kept]
    expected = {name: (trunk[0][name] + trunk[1][name] + trunk[2][name]) / 3 for name in trunk[0]}
    release = _release(run_dir, 1)
    for name, tensor in release.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    assert _differs(release, trunk[-1])
    assert f"average of 3 trunk checkpoint(s) ({', '.join(p.name for p in kept)})" in result.text
    # The trunk is untouched: its latest checkpoint is still the trained model.
    assert_bit_identical(weights(latest(run_dir)), trunk[-1])


class _StopAfter:
    """A GracefulStop stand-in whose signal arrives before branch step ``steps + 1``."""

    exit_code = 0

    def __init__(self, steps: int) -> None:
        self.checks = 0
        self.steps = steps

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks > self.steps


def test_a_stopped_cooldown_checkpoints_and_the_next_run_finishes_it_identically(tmp_path: Path, monkeypatch) -> None:
    from olm_cli import cooldown

    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12, **_wsd(1.0, run={"checkpoint_every": 100}))
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    reference = _release(run_dir, 1)
    # As if the run had died after the trunk's checkpoint: the release is pending.
    shutil.rmtree(run_dir / "releases")
    (run_dir / "cooldown-history.jsonl").unlink()
    run = cooldown.CooldownBranch.run
    monkeypatch.setattr(cooldown.CooldownBranch, "run", lambda self, stop: run(self, _StopAfter(3)))
    stopped = cli("train", "--config", recipe, "--json")
    monkeypatch.undo()
    assert stopped.code == 0 and stopped.json()["status"] == "interrupted", stopped.text
    assert "stopped during the cooldown of increment 1" in stopped.text
    assert [p.name for p in CheckpointManager(run_dir / "cooldown").list()] == ["step-00000003"]
    assert not (run_dir / "releases" / "release-0001").exists()

    finished = cli("train", "--config", recipe)
    assert finished.code == 0, finished.text
    assert "resuming at step 3/" in finished.text
    assert_bit_identical(_release(run_dir, 1), reference)


def test_a_pending_sma_release_is_the_same_average(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12, optim={"schedule": "constant"},
                         release={"merge": "sma", "merge_last": 2}, run={"checkpoint_every": 3, "keep_checkpoints": 2})
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    reference = _release(run_dir, 1)
    shutil.rmtree(run_dir / "releases")
    again = cli("train", "--config", recipe)
    assert again.code == 0, again.text
    assert "not released; evaluating and releasing it now" in again.text and "average of 2" in again.text
    assert_bit_identical(_release(run_dir, 1), reference)
