"""Issue 9, "never fail silently": checkpoints are re-hashed before use, and one that cannot be
used falls back to the previous one with one warning line, never a traceback.

Each test trains a tiny run in-process (checkpoints every 3 steps), damages its checkpoints
the way a disk, a copy or a bug would, then drives the real ``olm`` in a subprocess, as cron
does, and checks the exit code, the exact lines printed and the run directory afterwards.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_shard, make_documents, write_jsonl
from e2e_helpers import (
    REPO,
    Result,
    assert_bit_identical,
    cli,
    last_step,
    latest,
    ledger_summary,
    make_recipe,
    olm,
    reaped,
    subprocess_env,
    trainer_state,
    wait_for,
    weights,
)

from olm_cli.rundir import CheckpointManager
from olm_cli.rundir.checkpoint import MANIFEST_FILENAME
from olm_cli.rundir.ledger import sha256_file
from olm_cli.rundir.optimizer_state import (
    LEGACY_OPTIMIZER_FILE,
    OPTIMIZER_FILES,
    load_optimizer_state,
)

# End to end (a trained run, then real ``olm`` processes): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

# Replay state is part of what a fallback must restore, so the recipe keeps a buffer.
SECTIONS: dict[str, dict[str, Any]] = {
    "replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 48},
    "run": {"checkpoint_every": 3},
}
TIMEOUT = 240  # seconds for one real ``olm`` process (import, load, a few training steps)


def flip_bytes(path: Path, offset: int, count: int = 64) -> None:
    """Invert ``count`` bytes at ``offset`` in place: the size stays, only a re-hash can tell."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest describe the damaged files: a checkpoint *written* bad (a bug, another
    version), which verifies and then fails to load."""
    path = checkpoint / MANIFEST_FILENAME
    manifest = json.loads(path.read_text())
    files = sorted(p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*") if p.is_file() and p != path)
    manifest["files"] = [{"path": rel, "size": (checkpoint / rel).stat().st_size, "sha256": sha256_file(checkpoint / rel)}
                         for rel in files]
    path.write_text(json.dumps(manifest))


def _middle_of(name: str) -> Callable[[Path], None]:
    return lambda ckpt: flip_bytes(ckpt / name, (ckpt / name).stat().st_size // 2)


def _header(ckpt: Path) -> None:
    flip_bytes(ckpt / "model.safetensors", 8)  # the JSON header starts after its 8-byte length


def _garbage_state(ckpt: Path) -> None:
    state = ckpt / "trainer_state.json"
    state.write_bytes(b"{" + b"\xff" * (state.stat().st_size - 1))


def _as_olm_0_2(checkpoint: Path) -> Path:
    """Rewrite ``checkpoint`` the way olm 0.2 wrote it: the optimiser state in one ``optimizer.pt``
    (``torch.save``) instead of ``optimizer.json`` + ``optimizer.safetensors``; the manifest follows."""
    state = load_optimizer_state(checkpoint)
    for name in OPTIMIZER_FILES:
        (checkpoint / name).unlink(missing_ok=True)
    torch.save(state, checkpoint / LEGACY_OPTIMIZER_FILE)
    rewrite_manifest(checkpoint)
    return checkpoint


def _written_bad(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def both(ckpt: Path) -> None:
        damage(ckpt)
        rewrite_manifest(ckpt)

    return both


# name -> (damage done to the newest checkpoint, the reason the warning must give)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights_flipped": (_middle_of("model.safetensors"), "model.safetensors does not match its sha256"),
    "header_flipped": (_header, "model.safetensors does not match its sha256"),
    "optimizer_flipped": (_middle_of("optimizer.safetensors"), "optimizer.safetensors does not match its sha256"),
    "trainer_state_garbled": (_garbage_state, "trainer_state.json does not match its sha256"),
    "file_deleted": (lambda ckpt: (ckpt / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    # The manifest agrees with the damage: only loading can tell.
    "header_written_bad": (_written_bad(_header), "cannot load the model or tokenizer (Error while deserializing header"),
    "optimizer_written_bad": (_written_bad(lambda ckpt: flip_bytes(ckpt / "optimizer.safetensors", 0)),
                              "optimizer.safetensors is unreadable (Error while deserializing header"),
    "optimizer_structure_written_bad": (_written_bad(lambda ckpt: (ckpt / "optimizer.json").write_text("{}")),
                                        "cannot load optimizer.json (format None, this olm reads format 1)"),
    # A checkpoint of olm 0.2 keeps the optimiser in optimizer.pt (torch.save), still read when bad.
    "legacy_optimizer_written_bad": (_written_bad(lambda ckpt: flip_bytes(_as_olm_0_2(ckpt) / "optimizer.pt", 0)),
                                     "cannot load optimizer.pt (not a valid torch file: "),
    "trainer_state_written_bad": (_written_bad(_garbage_state), "trainer_state.json is unreadable ("),
}


def _trained_run(tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A finished increment with three checkpoints; returns recipe, run dir and what it holds."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12, **SECTIONS)
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    final = latest(run_dir)
    reference = {"weights": weights(final), "ledger": ledger_summary(run_dir), "state": trainer_state(final)}
    assert len(CheckpointManager(run_dir / "checkpoints").list()) >= 2
    assert {status for status, _, _ in reference["ledger"].values()} == {"done"}
    return recipe, run_dir, reference


def _lines(result: Result, marker: str) -> list[str]:
    return [line for line in result.text.splitlines() if marker in line]


@pytest.mark.parametrize("damage", DAMAGE)
def test_unusable_latest_falls_back_to_the_previous_checkpoint(tmp_path: Path, damage: str) -> None:
    recipe, run_dir, reference = _trained_run(tmp_path)
    broken = latest(run_dir)
    previous = CheckpointManager(run_dir / "checkpoints").list()[-2]
    spoil, reason = DAMAGE[damage]
    spoil(broken)
    add_shard(tmp_path / "stream", "beta", 0, docs=12)  # the next night brings new data

    result = olm("train", "--config", recipe, "--json", timeout=TIMEOUT)

    assert result.code == 0, result.text
    assert "Traceback" not in result.text
    warnings = _lines(result, "warning:")
    assert len(warnings) == 1, result.text
    assert warnings[0].startswith(f"warning: checkpoint {broken.name} is unusable ({reason}"), warnings
    assert warnings[0].endswith(f"); falling back to {previous.name}"), warnings
    # The older checkpoint is mid-increment: that increment is finished again from it, to the
    # very same weights and ledger (the new shard waits for the next night).
    assert result.json()["status"] == "increment_complete"
    assert result.json()["increment"] == reference["state"]["increment"]
    assert_bit_identical(weights(latest(run_dir)), reference["weights"])
    assert ledger_summary(run_dir) == reference["ledger"]
    assert trainer_state(latest(run_dir))["global_step"] == reference["state"]["global_step"]
    CheckpointManager(run_dir / "checkpoints").verify(latest(run_dir), deep=True)

    following = cli("train", "--config", recipe, "--json")
    assert following.code == 0 and following.json()["increment"] == reference["state"]["increment"] + 1
    assert "warning:" not in following.text
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}


def test_a_checkpoint_of_olm_0_2_resumes_bit_identically(tmp_path: Path) -> None:
    """Upgrading olm mid-increment: the checkpoint to continue from has ``optimizer.pt``, not the
    safetensors files; it is read (``torch.load(weights_only=True)``) and the increment ends
    with the very weights an uninterrupted run reached, its next checkpoints in the new format."""
    recipe, run_dir, reference = _trained_run(tmp_path)
    checkpoints = CheckpointManager(run_dir / "checkpoints")
    final = latest(run_dir)
    older = checkpoints.list()[-2]
    assert not trainer_state(older)["increment_complete"]
    _as_olm_0_2(older)
    assert checkpoints.step_back(final) == older  # as if the run had stopped there
    shutil.rmtree(final)

    result = cli("train", "--config", recipe, "--json")

    assert result.code == 0, result.text
    assert "warning:" not in result.text
    assert result.json()["status"] == "increment_complete"
    assert_bit_identical(weights(latest(run_dir)), reference["weights"])
    assert ledger_summary(run_dir) == reference["ledger"]
    written = {p.name for p in latest(run_dir).iterdir()}
    assert set(OPTIMIZER_FILES) <= written and LEGACY_OPTIMIZER_FILE not in written


def test_no_usable_checkpoint_is_an_error_not_a_silent_fresh_start(tmp_path: Path) -> None:
    recipe, run_dir, reference = _trained_run(tmp_path)
    checkpoints = CheckpointManager(run_dir / "checkpoints")
    every = checkpoints.list()
    for checkpoint in every:
        _middle_of("model.safetensors")(checkpoint)
    metrics = (run_dir / "metrics.jsonl").read_bytes()

    # Nothing new to train: planning uses the cheap size check only, so a quiet night stays quiet.
    quiet = cli("train", "--config", recipe, "--json")
    assert quiet.code == 0 and quiet.json()["status"] == "nothing_to_do", quiet.text

    add_shard(tmp_path / "stream", "beta", 0, docs=12)
    result = olm("train", "--config", recipe, timeout=TIMEOUT)

    assert result.code == 1, result.text
    assert "Traceback" not in result.text
    assert result.out == "" and len(result.err.strip().splitlines()) == 1, result.text
    line = result.err.strip()
    assert line.startswith(f"error: no usable checkpoint in {checkpoints.root}: "), line
    for checkpoint in every:
        assert f"{checkpoint.name} (model.safetensors does not match its sha256)" in line
    assert "would train every shard again" in line
    # Nothing was trained or rewritten: the trained shard is still done, the new one waits.
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics
    assert checkpoints.list() == every
    after = ledger_summary(run_dir)
    assert {name: entry for name, entry in after.items() if name in reference["ledger"]} == reference["ledger"]
    assert after["01-beta/shard-000.jsonl"][0] == "pending"


def test_eval_refuses_a_corrupt_checkpoint_in_one_line(tmp_path: Path) -> None:
    recipe, run_dir, _ = _trained_run(tmp_path)
    held_out = write_jsonl(tmp_path / "eval" / "alpha.jsonl", make_documents("alpha", 3, seed=99))
    broken = latest(run_dir)
    previous = CheckpointManager(run_dir / "checkpoints").list()[-2]
    plain = tmp_path / "plain-hf"  # a Hugging Face directory without a manifest, header damaged
    shutil.copytree(broken, plain)
    (plain / MANIFEST_FILENAME).unlink()
    _header(plain)
    _middle_of("model.safetensors")(broken)

    result = olm("eval", "--checkpoint", broken, "--data", f"alpha={held_out}", timeout=TIMEOUT)
    assert result.code == 1, result.text
    assert result.err.strip() == f"error: {broken}: model.safetensors does not match its sha256", result.text

    unverifiable = cli("eval", "--checkpoint", plain, "--data", f"alpha={held_out}")
    assert unverifiable.code == 1, unverifiable.text
    assert len(unverifiable.err.strip().splitlines()) == 1
    assert unverifiable.err.startswith(f"error: {plain}: cannot load the model or tokenizer (Error while deserializing header")

    # A run directory evaluates the newest checkpoint that verifies, and says which it skipped.
    fallback = cli("eval", "--run", run_dir, "--data", f"alpha={held_out}", "--json")
    assert fallback.code == 0, fallback.text
    assert fallback.json()["checkpoint"] == str(previous)
    assert fallback.err.strip() == (f"warning: checkpoint {broken.name} is unusable "
                                    f"(model.safetensors does not match its sha256); falling back to {previous.name}")

    inspected = cli("replay-inspect", "--run", run_dir, "--json")
    assert inspected.code == 0, inspected.text
    assert _lines(inspected, "warning:") == [fallback.err.strip()]

    merged = cli("merge", broken, previous, "--out", tmp_path / "merged")
    assert merged.code == 1 and not (tmp_path / "merged").exists()
    assert merged.err.strip() == f"error: {broken}: model.safetensors does not match its sha256"


# A real ``olm train`` whose second checkpoint write stalls (a slow disk): the first one is written
# normally, the second signals that it started and then sleeps in the writer thread.
_STALLING_OLM = """
import sys, time
from pathlib import Path
from olm_cli import checkpoint_snapshot
from olm_cli.cli import main

marker, real_write, writes = Path(sys.argv[1]), checkpoint_snapshot.TrainingSnapshot.write, []

def stalling_write(self, directory):
    writes.append(directory)
    if len(writes) == 2:
        marker.write_text(directory.name)
        time.sleep(600)
    real_write(self, directory)

checkpoint_snapshot.TrainingSnapshot.write = stalling_write
sys.argv = ["olm", *sys.argv[2:]]
main()
"""


def test_kill_9_during_a_background_write_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    """Training goes on while a checkpoint is written; killed then, ``latest`` is still the one
    before it, and a plain rerun ends bit-identical to a run never interrupted."""
    shards = [("alpha", 0), ("beta", 0)]
    reference = cli("train", "--config", make_recipe(tmp_path / "reference", shards=shards, docs=12, **SECTIONS), "--json")
    assert reference.code == 0, reference.text
    ref_weights = weights(latest(tmp_path / "reference" / "run"))
    recipe = make_recipe(tmp_path / "trial", shards=shards, docs=12, **SECTIONS)
    run_dir = tmp_path / "trial" / "run"
    marker = tmp_path / "second-write-started"
    log = tmp_path / "trial.log"

    with open(log, "wb") as handle:  # the child keeps its own descriptor
        child = subprocess.Popen([sys.executable, "-c", _STALLING_OLM, str(marker), "train", "--config", str(recipe)],
                                 stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
    with reaped(child) as proc:
        wait_for(marker.exists, proc, timeout=TIMEOUT, what="the second checkpoint write")
        # The step-6 checkpoint is being written in the background; the loop trains on meanwhile.
        wait_for(lambda: last_step(run_dir) >= 8, proc, timeout=TIMEOUT, what="training past the stalled write")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, log.read_text()

    checkpoints = CheckpointManager(run_dir / "checkpoints")
    assert [p.name for p in checkpoints.list()] == ["step-00000003"]
    assert latest(run_dir).name == "step-00000003"
    assert (checkpoints.root / ".tmp-step-00000006").is_dir()  # the write in flight, never published
    assert json.loads((run_dir / "ledger.json").read_text())["shards"] == trainer_state(latest(run_dir))["ledger"]["shards"]

    result = cli("train", "--config", recipe, "--json")

    assert result.code == 0, result.text
    assert result.json()["status"] == "increment_complete"
    assert_bit_identical(weights(latest(run_dir)), ref_weights)
    assert ledger_summary(run_dir) == ledger_summary(tmp_path / "reference" / "run")
    assert not [p.name for p in checkpoints.root.iterdir() if p.name.startswith(".")]
