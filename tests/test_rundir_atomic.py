"""Crash-safe writes: logs that only grow, directories published whole, links swapped in one rename."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from olm_cli.rundir import atomic
from olm_cli.rundir.atomic import (
    append_line_durable,
    publishing_directory,
    replace_symlink,
    staged_file,
    staging_name,
)


def test_appended_lines_are_fsynced_and_the_new_file_name_too(tmp_path: Path, monkeypatch) -> None:
    synced: list[Path] = []
    monkeypatch.setattr(atomic, "fsync_dir", lambda path: synced.append(Path(path)))
    log = tmp_path / "eval" / "history.jsonl"
    append_line_durable(log, json.dumps({"increment": 1}))
    append_line_durable(log, json.dumps({"increment": 2}) + "\n")  # a trailing newline is not doubled
    assert log.read_text() == '{"increment": 1}\n{"increment": 2}\n'
    assert synced == [log.parent]  # only when the file was created


def test_a_line_torn_by_a_crash_does_not_swallow_the_next_one(tmp_path: Path) -> None:
    log = tmp_path / "history.jsonl"
    log.write_text('{"increment": 1}\n{"incre')  # killed mid-append
    append_line_durable(log, json.dumps({"increment": 2}))
    lines = log.read_text().splitlines()
    assert lines == ['{"increment": 1}', '{"incre', '{"increment": 2}']
    assert json.loads(lines[-1]) == {"increment": 2}


def test_a_published_directory_replaces_the_old_one_whole(tmp_path: Path) -> None:
    final = tmp_path / "cache"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    staging_name(final).mkdir()  # left by a killed writer
    (staging_name(final) / "half.bin").write_bytes(b"half")
    old = os.umask(0o027)
    try:
        with publishing_directory(final) as staged:
            assert list(staged.iterdir()) == []  # the leftover was cleared
            (staged / "model.bin").write_bytes(b"new")
            os.chmod(staged / "model.bin", 0o600)  # as safetensors writes it
    finally:
        os.umask(old)
    assert sorted(p.name for p in final.iterdir()) == ["model.bin"]
    assert (final / "model.bin").stat().st_mode & 0o777 == 0o640
    assert not staging_name(final).exists()


def test_a_failed_publication_leaves_the_old_directory_alone(tmp_path: Path) -> None:
    final = tmp_path / "merged"
    final.mkdir()
    (final / "old.bin").write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), publishing_directory(final) as staged:
        (staged / "model.bin").write_bytes(b"ha")
        raise OSError("disk full")
    assert sorted(p.name for p in final.iterdir()) == ["old.bin"]
    assert not staging_name(final).exists()


def test_replace_symlink_swaps_and_removes(tmp_path: Path) -> None:
    link = tmp_path / "latest"
    replace_symlink(link, "step-1")
    replace_symlink(link, "step-2")
    assert os.readlink(link) == "step-2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temporary link left
    replace_symlink(link, None)
    assert not os.path.lexists(link)


def test_staged_file_appears_whole_and_never_replaces_without_overwrite(tmp_path: Path) -> None:
    """For libraries that open the output themselves (the GGUF writer): they get a path of ours."""
    out = tmp_path / "model.gguf"
    with staged_file(out, overwrite=False) as staged:
        assert staged.parent == tmp_path and staged.is_file() and not out.exists()
        staged.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    with pytest.raises(FileExistsError):
        with staged_file(out, overwrite=False) as staged:
            pass
    with pytest.raises(RuntimeError):
        with staged_file(out) as staged:
            staged.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert out.read_bytes() == b"first"
    with staged_file(out) as staged:
        staged.write_bytes(b"second")
    assert out.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
