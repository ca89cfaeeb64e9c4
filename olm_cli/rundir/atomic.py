"""Crash-safe file writes for the run directory.

A cron job can be killed at any instruction (kill -9, power loss, a full disk). Every file
the run directory treats as state is therefore replaced, never edited: the new content goes
to a temporary name in the same directory, is flushed and fsynced, and ``os.replace`` swaps
it in. Readers see either the old file or the new one, never a torn mix. The directory is
fsynced afterwards so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (creations, renames, deletions) to disk.

    Without this, a file that was fsynced and renamed can still vanish after a power cut
    because the directory block that names it was never written.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file that somebody else wrote (e.g. ``torch.save``) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    The temporary name carries the pid so two processes that (wrongly) write the same file
    cannot clobber each other's half-written temp file. On any error the temp file is
    removed and the original is untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable diffs, readable by humans)."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))
