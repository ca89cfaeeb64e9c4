"""Append-only segment files that hold the buffer's token (and logit) bytes on disk.

Why segments and not one array file: a checkpoint must capture the buffer cheaply and
without ever being disturbed by later training. Every segment is written once, sealed
(fsync + close) at the latest when a snapshot is taken, and never written again. A snapshot
is then a set of *hard links* to sealed segments plus a small metadata table: O(number of
segments), not O(bytes). Deleting an old snapshot only drops links; a crash while saving
cannot touch an earlier snapshot because no existing file is modified.

Evicted samples leave dead bytes behind; the buffer compacts sparse segments by copying
their live samples into the active segment (see ``DiskReplayBuffer._maybe_compact``), so
disk use stays within about twice the live data plus one segment.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from olm_cli.rundir.atomic import fsync_dir

SEGMENT_BYTES = 64 << 20
_MAX_OPEN_READERS = 128


def segment_name(segment: int) -> str:
    return f"seg-{segment:08d}.bin"


class SegmentStore:
    """Byte log over numbered segment files in one directory the store owns."""

    def __init__(self, directory: Path, segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.directory.mkdir(parents=True, exist_ok=True)
        self.sizes: dict[int, int] = {}  # bytes written per segment still on disk
        self.live: dict[int, int] = {}  # bytes of live samples per segment
        self.active = -1
        self._write_fd = -1
        self._readers: dict[int, int] = {}
        self._next = 0
        self.clear()

    # -- lifecycle -----------------------------------------------------------------------
    def clear(self) -> None:
        """Drop every segment: the directory is scratch space, snapshots are the truth."""
        self.close()
        for path in self.directory.glob("seg-*.bin"):
            path.unlink()
        self.sizes.clear()
        self.live.clear()
        self._next = 0

    def close(self) -> None:
        if self._write_fd >= 0:
            os.close(self._write_fd)
            self._write_fd = -1
        self.active = -1
        for fd in self._readers.values():
            os.close(fd)
        self._readers.clear()

    # -- writing -------------------------------------------------------------------------
    def append(self, payload: bytes) -> tuple[int, int]:
        """Write ``payload`` at the end of the active segment; returns (segment, offset)."""
        size = len(payload)
        if self.active < 0 or (
            self.sizes[self.active] > 0 and self.sizes[self.active] + size > self.segment_bytes
        ):
            self._open_new()
        segment = self.active
        offset = self.sizes[segment]
        view = memoryview(payload)
        while view:
            written = os.write(self._write_fd, view)
            view = view[written:]
        self.sizes[segment] = offset + size
        self.live[segment] = self.live.get(segment, 0) + size
        return segment, offset

    def _open_new(self) -> None:
        self.seal()
        segment = self._next
        self._next += 1
        path = self.directory / segment_name(segment)
        self._write_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        self.active = segment
        self.sizes[segment] = 0
        self.live.setdefault(segment, 0)

    def seal(self) -> None:
        """Flush the active segment to disk and never write it again."""
        if self._write_fd >= 0:
            os.fsync(self._write_fd)
            os.close(self._write_fd)
            self._write_fd = -1
        active, self.active = self.active, -1
        if active >= 0 and self.live.get(active, 0) == 0:
            self._drop(active)

    def release(self, segment: int, nbytes: int) -> None:
        """A sample of ``nbytes`` in ``segment`` was evicted; unlink the segment once empty."""
        remaining = self.live[segment] - nbytes
        self.live[segment] = remaining
        if remaining == 0 and segment != self.active:
            self._drop(segment)

    def _drop(self, segment: int) -> None:
        fd = self._readers.pop(segment, None)
        if fd is not None:
            os.close(fd)
        (self.directory / segment_name(segment)).unlink(missing_ok=True)
        self.sizes.pop(segment, None)
        self.live.pop(segment, None)

    # -- reading -------------------------------------------------------------------------
    def read(self, segment: int, offset: int, nbytes: int) -> bytearray:
        fd = self._readers.get(segment)
        if fd is None:
            if len(self._readers) >= _MAX_OPEN_READERS:
                for old in self._readers.values():
                    os.close(old)
                self._readers.clear()
            fd = self._readers[segment] = os.open(
                self.directory / segment_name(segment), os.O_RDONLY
            )
        return read_exact(fd, offset, nbytes)

    # -- accounting ----------------------------------------------------------------------
    @property
    def disk_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def live_bytes(self) -> int:
        return sum(self.live.values())

    def sparse_segments(self, max_segments: int = 256) -> list[int]:
        """Sealed segments worth compacting: under half live, or the smallest when too many."""
        sealed = [s for s in self.sizes if s != self.active]
        chosen = {s for s in sealed if self.live[s] * 2 < self.sizes[s]}
        if len(sealed) > max_segments:
            by_size = sorted(sealed, key=lambda s: (self.live[s], s))
            chosen.update(by_size[: len(sealed) - max_segments // 2])
        return sorted(chosen)

    # -- snapshots -----------------------------------------------------------------------
    def export(self, target: Path) -> dict[int, int]:
        """Link every segment holding live data into ``target``; returns {segment: bytes}.

        Call :meth:`seal` first: only sealed (immutable) segments may be shared.
        """
        if self._write_fd >= 0:
            raise RuntimeError("seal() the store before exporting it")
        target.mkdir(parents=True, exist_ok=True)
        exported: dict[int, int] = {}
        for segment in sorted(self.sizes):
            if self.live.get(segment, 0) == 0:
                continue
            name = segment_name(segment)
            link_or_copy(self.directory / name, target / name)
            exported[segment] = self.sizes[segment]
        fsync_dir(target)
        return exported

    def adopt(self, source: Path, segments: dict[int, int]) -> None:
        """Replace this store's content by a snapshot's segments (linked, never modified)."""
        self.clear()
        for segment, size in segments.items():
            name = segment_name(segment)
            link_or_copy(source / name, self.directory / name)
            self.sizes[segment] = size
            self.live[segment] = 0
        self._next = max(segments, default=-1) + 1


def link_or_copy(source: Path, target: Path) -> None:
    """Hard link when source and target share a filesystem, else copy (and fsync)."""
    try:
        os.link(source, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copyfile(source, target)
    with open(target, "rb+") as handle:
        os.fsync(handle.fileno())


def read_exact(fd: int, offset: int, nbytes: int) -> bytearray:
    """pread into a writable buffer (numpy views of it are writable, unlike of bytes)."""
    buffer = bytearray(nbytes)
    view = memoryview(buffer)
    done = 0
    while done < nbytes:
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise OSError(errno.EIO, f"replay segment truncated at byte {offset + done}")
        done += got
    return buffer
