"""On-disk format of one buffer snapshot, shared by ``DiskReplayBuffer`` and ``replay-inspect``.

::

    replay/
      manifest.json        written last: its presence means the snapshot is complete
      samples.arrow        Arrow IPC file, one row per live sample (metadata only)
      arrays.safetensors   free-slot stack and policy arrays (e.g. priority tree leaves)
      segments/seg-*.bin   token bytes: hard links to immutable segment files

No pickle anywhere: a snapshot can be read by pyarrow, safetensors and json alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc

from olm_cli.errors import CheckpointError
from olm_cli.replay.store import fsync_dir, read_exact, segment_name

FORMAT = "olm-replay/1"
MANIFEST = "manifest.json"
SAMPLES = "samples.arrow"
ARRAYS = "arrays.safetensors"
SEGMENTS = "segments"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_arrow(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"no replay snapshot at {directory} (missing {MANIFEST})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable replay manifest {path}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: unsupported replay snapshot format {manifest.get('format')!r} "
            f"(expected {FORMAT!r})"
        )
    return manifest


def read_samples(directory: Path) -> pa.Table:
    with pa.memory_map(str(Path(directory) / SAMPLES), "r") as source:
        return pa.ipc.open_file(source).read_all()


class SnapshotReader:
    """Read-only view of a snapshot: metadata as an Arrow table, tokens on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.samples = read_samples(self.directory)
        self._fds: dict[int, int] = {}

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def tokens(self, row: int) -> np.ndarray:
        segment = int(self.samples.column("segment")[row].as_py())
        offset = int(self.samples.column("offset")[row].as_py())
        length = int(self.samples.column("length")[row].as_py())
        fd = self._fds.get(segment)
        if fd is None:
            path = self.directory / SEGMENTS / segment_name(segment)
            fd = self._fds[segment] = os.open(path, os.O_RDONLY)
        return np.frombuffer(read_exact(fd, offset, 4 * length), dtype=np.int32)
