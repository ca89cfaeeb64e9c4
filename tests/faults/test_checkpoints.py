"""Issue 9, "never fail silently": checkpoints are re-hashed before use, and one that cannot be
used falls back to the previous one with one warning line, never a traceback.

Each test trains a tiny run in-process (checkpoints every 3 steps), damages its checkpoints
the way a disk, a copy or a bug would, then drives the real ``olm`` in a subprocess, as cron
does, and checks the exit code, the exact lines printed and the run directory afterwards.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import add_shard, make_documents, write_jsonl
from e2e_helpers import (
    Result,
    assert_bit_identical,
    cli,
    latest,
    ledger_summary,
    make_recipe,
    olm,
    trainer_state,
    weights,
)

from olm_cli.rundir import CheckpointManager
from olm_cli.rundir.checkpoint import MANIFEST_FILENAME
from olm_cli.rundir.ledger import sha256_file

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
    for item in manifest["files"]:
        file = checkpoint / item["path"]
        item["size"], item["sha256"] = file.stat().st_size, sha256_file(file)
    path.write_text(json.dumps(manifest))


def _middle_of(name: str) -> Callable[[Path], None]:
    return lambda ckpt: flip_bytes(ckpt / name, (ckpt / name).stat().st_size // 2)


def _header(ckpt: Path) -> None:
    flip_bytes(ckpt / "model.safetensors", 8)  # the JSON header starts after its 8-byte length


def _garbage_state(ckpt: Path) -> None:
    state = ckpt / "trainer_state.json"
    state.write_bytes(b"{" + b"\xff" * (state.stat().st_size - 1))


def _written_bad(damage: Callable[[Path], None]) -> Callable[[Path], None]:
    def both(ckpt: Path) -> None:
        damage(ckpt)
        rewrite_manifest(ckpt)

    return both


# name -> (damage done to the newest checkpoint, the reason the warning must give)
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights_flipped": (_middle_of("model.safetensors"), "model.safetensors does not match its sha256"),
    "header_flipped": (_header, "model.safetensors does not match its sha256"),
    "optimizer_flipped": (_middle_of("optimizer.pt"), "optimizer.pt does not match its sha256"),
    "trainer_state_garbled": (_garbage_state, "trainer_state.json does not match its sha256"),
    "file_deleted": (lambda ckpt: (ckpt / "tokenizer.json").unlink(), "tokenizer.json is missing"),
    # The manifest agrees with the damage: only loading can tell.
    "header_written_bad": (_written_bad(_header), "cannot load the model or tokenizer (Error while deserializing header"),
    "optimizer_written_bad": (_written_bad(lambda ckpt: flip_bytes(ckpt / "optimizer.pt", 0)),
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
