"""On-disk format of one buffer snapshot, shared by ``DiskReplayBuffer`` and ``replay-inspect``.

::

    replay/
      manifest.json        written last: its presence means the snapshot is complete
      columns/<name>.npy   per-sample metadata, one .npy per column, rows in live order
      state/<name>.npy     free-slot stack and policy arrays (e.g. priority tree leaves)
      segments/seg-*.bin   token bytes: hard links to immutable segment files

Plain ``.npy`` files (no pickle: loaded with ``allow_pickle=False``) rather than Arrow: they
are written one column at a time from the in-RAM columns, read back memory-mapped, and keep
pyarrow's ~50 MB of one-time initialisation out of the training process. Domain and shard
names are string tables in the manifest; the ``domain``/``shard`` columns hold their codes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from olm_cli.errors import CheckpointError
from olm_cli.replay.store import fsync_dir, read_exact, segment_name
from olm_cli.rundir.atomic import write_text_atomic

FORMAT = "olm-replay/1"
MANIFEST = "manifest.json"
COLUMNS_DIR = "columns"
STATE_DIR = "state"
SEGMENTS = "segments"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """The manifest as the replay reader expects it (keys in insertion order), written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=1))


def write_arrays(directory: Path, arrays: Iterable[tuple[str, np.ndarray]]) -> None:
    """One fsynced ``name.npy`` per array; arrays may be produced lazily, one at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, array in arrays:
        with open(directory / f"{name}.npy", "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
    fsync_dir(directory)


def read_arrays(directory: Path, mmap: bool = True) -> dict[str, np.ndarray]:
    try:
        return {
            path.stem: np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
            for path in sorted(Path(directory).glob("*.npy"))
        }
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable replay snapshot arrays in {directory}: {exc}") from exc


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


class SnapshotReader:
    """Read-only view of a snapshot: metadata columns memory-mapped, tokens on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.columns = read_arrays(self.directory / COLUMNS_DIR)
        self.domains: list[str] = self.manifest["table"]["domains"]
        self.shards: list[str] = self.manifest["table"]["shards"]
        self._fds: dict[int, int] = {}

    def __len__(self) -> int:
        return int(self.columns["id"].shape[0])

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def tokens(self, row: int) -> np.ndarray:
        segment = int(self.columns["segment"][row])
        offset = int(self.columns["offset"][row])
        length = int(self.columns["length"][row])
        fd = self._fds.get(segment)
        if fd is None:
            path = self.directory / SEGMENTS / segment_name(segment)
            fd = self._fds[segment] = os.open(path, os.O_RDONLY)
        return np.frombuffer(read_exact(fd, offset, 4 * length), dtype=np.int32)
