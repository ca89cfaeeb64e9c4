"""ShardLedger: scanning real shard files, persistence and crash/resume semantics."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from olm_cli.errors import CheckpointError
from olm_cli.rundir import ledger as ledger_mod
from olm_cli.rundir.ledger import ShardLedger, ShardStatus


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def shard(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.txt"))


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_missing_file_is_empty_and_scan_registers_new_shards_sorted(tmp_path: Path, data: Path):
    shard(data, "b.txt", "bravo")
    shard(data, "a.txt", "alpha")
    ledger = ShardLedger.load(tmp_path / "ledger.json")
    assert len(ledger) == 0

    result = ledger.scan(shards(data))

    assert [Path(e.path).name for e in result.pending] == ["a.txt", "b.txt"]
    assert [Path(e.path).name for e in result.new] == ["a.txt", "b.txt"]
    entry = ledger.get(data / "a.txt")
    assert entry.path == str((data / "a.txt").resolve())
    assert entry.sha256 == hashlib.sha256(b"alpha").hexdigest()
    assert entry.size == 5 and entry.status is ShardStatus.PENDING and entry.first_seen
    assert ledger.counts()["pending"] == 2


def test_save_load_roundtrip_is_atomic_json(tmp_path: Path, data: Path):
    shard(data, "a.txt", "alpha")
    path = tmp_path / "run" / "ledger.json"
    ledger = ShardLedger.load(path)
    ledger.scan(shards(data))
    inc = ledger.start_increment()
    ledger.mark_in_progress(data / "a.txt", inc)
    ledger.add_tokens(data / "a.txt", 7, position=3)
    ledger.mark_done(data / "a.txt", tokens=5)
    ledger.save()

    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp file left
    loaded = ShardLedger.load(path)
    assert loaded.state_dict() == ledger.state_dict()
    entry = loaded.get(data / "a.txt")
    assert (entry.status, entry.tokens, entry.increment, entry.position) == (
        ShardStatus.DONE,
        12,
        1,
        3,
    )
    assert entry.finished_at is not None
    assert loaded.total_tokens == 12 and loaded.increment == 1
    assert json.loads(path.read_text())["shards"][0]["status"] == "done"


def test_corrupt_ledger_is_an_error_naming_the_file(tmp_path: Path):
    path = tmp_path / "ledger.json"
    path.write_text('{"shards": [')
    with pytest.raises(CheckpointError, match=str(path)):
        ShardLedger.load(path)
    path.write_text('{"shards": [{"path": "x"}]}')
    with pytest.raises(CheckpointError, match="corrupt"):
        ShardLedger.load(path)


def test_unchanged_files_are_not_rehashed(tmp_path: Path, data: Path, monkeypatch):
    shard(data, "a.txt", "alpha")
    shard(data, "b.txt", "bravo")
    calls: list[str] = []
    real = ledger_mod.sha256_file
    monkeypatch.setattr(ledger_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    ledger = ShardLedger.load(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    assert len(calls) == 2
    ledger.save()

    again = ShardLedger.load(tmp_path / "ledger.json")
    calls.clear()
    again.scan(shards(data))
    assert calls == []
    bump_mtime(data / "b.txt")  # touched, same bytes: hashed once, still pending
    again.scan(shards(data))
    assert [Path(c).name for c in calls] == ["b.txt"]
    assert again.get(data / "b.txt").status is ShardStatus.PENDING


def test_done_shard_that_changes_is_reported_not_retrained(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, tokens=10, increment=1)

    a.write_text("alpha, edited")
    bump_mtime(a)
    result = ledger.scan(shards(data))

    assert result.pending == []
    assert [e.path for e in result.changed] == [str(a.resolve())]
    entry = ledger.get(a)
    assert entry.status is ShardStatus.CHANGED
    assert "content changed after training" in (entry.reason or "")
    assert entry.tokens == 10
    # Reported again next night, still not trained.
    assert [e.status for e in ledger.scan(shards(data)).changed] == [ShardStatus.CHANGED]

    retrain = ledger.scan(shards(data), retrain_changed=True)
    assert [e.path for e in retrain.pending] == [str(a.resolve())]
    assert retrain.changed == [] and retrain.requeued == [entry]
    assert entry.status is ShardStatus.PENDING and entry.reason is None
    ledger.mark_done(a, tokens=3)
    assert entry.tokens == 13  # tokens count every pass over this path


def test_plan_orders_in_progress_first_and_limits(tmp_path: Path, data: Path):
    for name in ("c.txt", "a.txt", "b.txt", "d.txt"):
        shard(data, name, name)
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_in_progress(data / "c.txt", 1)
    ledger.mark_done(data / "a.txt", 1, 1)

    result = ledger.scan(shards(data))
    assert [Path(e.path).name for e in result.pending] == ["c.txt", "b.txt", "d.txt"]
    assert [Path(e.path).name for e in ledger.plan(2)] == ["c.txt", "b.txt"]
    assert len(ledger.plan(None)) == 3
    with pytest.raises(ValueError):
        ledger.plan(0)


def test_missing_unfinished_shards_are_reported_and_not_planned(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    shard(data, "b.txt", "bravo")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    a.unlink()
    result = ledger.scan(shards(data))
    assert [Path(e.path).name for e in result.missing] == ["a.txt"]
    assert [Path(e.path).name for e in ledger.plan()] == ["b.txt"]


def test_duplicate_content_is_skipped(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "same bytes")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, 4, 1)
    copy = shard(data, "renamed-copy.txt", "same bytes")

    result = ledger.scan(shards(data))

    assert [e.path for e in result.duplicates] == [str(copy.resolve())]
    assert ledger.get(copy).status is ShardStatus.SKIPPED
    assert str(a.resolve()) in (ledger.get(copy).reason or "")
    assert result.pending == []
    # New bytes make it a new shard again.
    copy.write_text("different bytes now")
    bump_mtime(copy)
    result = ledger.scan(shards(data))
    assert [e.path for e in result.requeued] == [str(copy.resolve())]
    assert ledger.get(copy).status is ShardStatus.PENDING


def test_quarantine_sticks_until_content_changes(tmp_path: Path, data: Path):
    bad = shard(data, "bad.txt", "\x00garbage")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.quarantine(bad, "record 3 is not valid UTF-8")
    assert ledger.scan(shards(data)).pending == []
    assert ledger.get(bad).reason == "record 3 is not valid UTF-8"

    bad.write_text("fixed text")
    bump_mtime(bad)
    result = ledger.scan(shards(data))
    assert [e.path for e in result.requeued] == [str(bad.resolve())]
    assert [e.path for e in result.pending] == [str(bad.resolve())]


def test_unreadable_shard_is_quarantined_and_retried(tmp_path: Path, data: Path, monkeypatch):
    locked = shard(data, "locked.txt", "secret")
    real = ledger_mod.sha256_file

    def denied(path):
        if Path(path).name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(ledger_mod, "sha256_file", denied)
    ledger = ShardLedger(tmp_path / "ledger.json")
    result = ledger.scan(shards(data))
    assert [e.path for e in result.unreadable] == [str(locked.resolve())]
    assert ledger.get(locked).status is ShardStatus.QUARANTINED
    assert ledger.get(locked).reason == "cannot read: Permission denied"
    assert ledger.scan(shards(data)).pending == []

    # Fixing permissions does not change mtime; the never-hashed entry is retried anyway.
    monkeypatch.setattr(ledger_mod, "sha256_file", real)
    assert [e.path for e in ledger.scan(shards(data)).pending] == [str(locked.resolve())]


def test_resume_restores_checkpoint_copy_exactly(tmp_path: Path, data: Path):
    """Crash after a shard was marked done but before the checkpoint holding it.

    The checkpoint copy says a.txt done, b.txt in progress at position 2; the live file
    (written later) says both done. Resume must believe the checkpoint: b.txt is trained
    again from position 2, a.txt is not trained again.
    """
    a, b = shard(data, "a.txt", "alpha"), shard(data, "b.txt", "bravo")
    run_ledger = tmp_path / "ledger.json"
    ledger = ShardLedger(run_ledger)
    ledger.scan(shards(data))
    inc = ledger.start_increment()
    ledger.mark_in_progress(a, inc)
    ledger.mark_done(a, 100)
    ledger.mark_in_progress(b, inc)
    ledger.add_tokens(b, 40, position=2)
    checkpoint_state = ledger.state_dict()  # captured with the weights at step 10

    ledger.mark_done(b, 60)  # after the checkpoint ...
    ledger.save()  # ... and persisted to RUN/ledger.json, then kill -9
    run_ledger.write_text("{")  # even a torn view file does not block the resume

    resumed = ShardLedger.resume(run_ledger, checkpoint_state)
    assert resumed.state_dict() == checkpoint_state
    assert resumed.path == run_ledger
    resumed.scan(shards(data))
    plan = resumed.plan()
    assert [(Path(e.path).name, e.status, e.position) for e in plan] == [
        ("b.txt", ShardStatus.IN_PROGRESS, 2)
    ]
    assert resumed.start_increment() == 2


def test_resume_without_checkpoint_rewinds_everything(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, 50, 1)
    ledger.save()

    resumed = ShardLedger.resume(tmp_path / "ledger.json", None)
    entry = resumed.get(a)
    assert (entry.status, entry.tokens, entry.finished_at) == (ShardStatus.PENDING, 0, None)


def test_load_state_dict_replaces_and_rejects_bad_format(tmp_path: Path, data: Path):
    shard(data, "a.txt", "alpha")
    first = ShardLedger(tmp_path / "l.json")
    first.scan(shards(data))
    second = ShardLedger(tmp_path / "other.json")
    second.load_state_dict(first.state_dict())
    assert [e.path for e in second] == [e.path for e in first]
    with pytest.raises(CheckpointError, match="unsupported format"):
        second.load_state_dict({"format": 99, "shards": []})


def test_counts_include_every_status(tmp_path: Path):
    assert ShardLedger(tmp_path / "l.json").counts() == {s.value: 0 for s in ShardStatus}


def test_unknown_shard_raises_keyerror_naming_it(tmp_path: Path):
    with pytest.raises(KeyError, match="nope.txt"):
        ShardLedger(tmp_path / "l.json").mark_done(tmp_path / "nope.txt", 1)


# ------------------------------------------------------------------ content already trained


def test_edited_shard_whose_original_bytes_reappear_under_a_new_name_is_skipped(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, tokens=10, increment=1)
    a.write_text("alpha, edited")
    bump_mtime(a)
    ledger.scan(shards(data))
    assert ledger.get(a).status is ShardStatus.CHANGED  # its current hash is no longer "alpha"

    b = shard(data, "b.txt", "alpha")  # the trained bytes, under a new name
    result = ledger.scan(shards(data), retrain_changed=False)

    entry = ledger.get(b)
    assert entry.status is ShardStatus.SKIPPED and result.duplicates == [entry]
    assert entry.reason == f"same content as {a.resolve()}, already trained (sha256 {entry.sha256[:12]})"
    assert result.pending == []


def test_change_and_change_back_is_skipped_even_with_retrain_changed(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_in_progress(a, 1)
    ledger.mark_done(a, tokens=10, increment=1)
    a.write_text("alpha, edited")
    bump_mtime(a)
    ledger.scan(shards(data))
    a.write_text("alpha")
    bump_mtime(a)

    result = ledger.scan(shards(data), retrain_changed=True)

    entry = ledger.get(a)
    assert entry.status is ShardStatus.SKIPPED and result.duplicates == [entry]
    assert "same content as this path, before it was edited, already trained" in (entry.reason or "")
    assert result.pending == [] and entry.tokens == 10
    # Edited once more to new bytes: a trained path, so "changed" again, not silently pending.
    a.write_text("alpha, edited twice")
    bump_mtime(a)
    assert [e.path for e in ledger.scan(shards(data)).changed] == [str(a.resolve())]


def test_trained_index_survives_save_and_checkpoint_copies(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, tokens=10, increment=1)
    a.write_text("alpha, edited")
    bump_mtime(a)
    ledger.scan(shards(data))
    ledger.save()

    digest = hashlib.sha256(b"alpha").hexdigest()
    assert json.loads((tmp_path / "ledger.json").read_text())["trained"] == {digest: str(a.resolve())}
    for copy in (ShardLedger.load(tmp_path / "ledger.json"),
                 ShardLedger.resume(tmp_path / "ledger.json", ledger.state_dict())):
        assert copy.trained_from(digest) == str(a.resolve())
    # Without a checkpoint nothing is in the weights: the index starts over too.
    assert ShardLedger.resume(tmp_path / "ledger.json", None).trained_from(digest) is None


def test_format_1_ledger_without_an_index_still_loads(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, tokens=10, increment=1)
    old = ledger.state_dict()
    del old["trained"]
    for entry in old["shards"]:
        del entry["split_documents"], entry["skipped_documents"]
    (tmp_path / "ledger.json").write_text(json.dumps(old))

    loaded = ShardLedger.load(tmp_path / "ledger.json")

    assert loaded.trained_from(hashlib.sha256(b"alpha").hexdigest()) == str(a.resolve())  # rebuilt
    shard(data, "copy.txt", "alpha")
    assert loaded.scan(shards(data)).duplicates[0].path == str((data / "copy.txt").resolve())


def test_long_document_counts_are_recorded_on_done(tmp_path: Path, data: Path):
    a = shard(data, "a.txt", "alpha")
    ledger = ShardLedger(tmp_path / "ledger.json")
    ledger.scan(shards(data))
    ledger.mark_done(a, increment=1, long_documents={"split": 2, "skipped": 1})
    ledger.save()
    entry = ShardLedger.load(tmp_path / "ledger.json").get(a)
    assert (entry.split_documents, entry.skipped_documents) == (2, 1)


# ------------------------------------------------------------------ files that are not files


def test_fifo_device_loop_and_broken_link_are_quarantined_never_opened(tmp_path: Path, data: Path, monkeypatch):
    good = shard(data, "a.txt", "alpha")
    os.mkfifo(data / "pipe.txt")  # opening it for reading would block forever
    (data / "zero.txt").symlink_to("/dev/zero")  # reading it would never end
    (data / "loop.txt").symlink_to(data / "loop.txt")
    (data / "gone.txt").symlink_to(data / "nowhere.txt")
    opened: list[str] = []
    real = ledger_mod.sha256_file
    monkeypatch.setattr(ledger_mod, "sha256_file", lambda p: opened.append(Path(p).name) or real(p))
    ledger = ShardLedger(tmp_path / "ledger.json")

    paths = [good, data / "pipe.txt", data / "zero.txt", data / "loop.txt", data / "gone.txt"]
    result = ledger.scan(paths)

    assert opened == ["a.txt"]
    reasons = {Path(e.path).name: (e.status, e.reason) for e in result.unreadable}
    assert reasons == {
        "pipe.txt": (ShardStatus.QUARANTINED, "not a regular file (FIFO)"),
        "zero.txt": (ShardStatus.QUARANTINED, "not a regular file (character device)"),
        "loop.txt": (ShardStatus.QUARANTINED, "symlink loop"),
        "gone.txt": (ShardStatus.QUARANTINED, "broken symlink"),
    }
    assert [Path(e.path).name for e in result.pending] == ["a.txt"]
    # Keyed by the link's own path, so the report names what is in the folder, not /dev/zero.
    assert ledger.get(data / "pipe.txt").path == str(data / "pipe.txt")
    assert str(data / "zero.txt") in {e.path for e in ledger.entries}
    assert ledger.scan(paths).unreadable == []  # reported once, stays quarantined


def test_sha256_file_refuses_a_fifo_without_blocking(tmp_path: Path):
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ledger_mod.NotARegularFileError, match=r"not a regular file \(FIFO\)"):
        ledger_mod.sha256_file(tmp_path / "pipe")
