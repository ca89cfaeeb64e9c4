"""Checkpoints that are either complete or invisible.

A checkpoint is written into ``.tmp-step-N/``, described by ``MANIFEST.json`` (every
file's size and sha256), fsynced, renamed to ``step-N/`` and only then published by moving
the ``latest`` symlink with one atomic ``os.replace``. A crash or a full disk at any point
leaves the previous checkpoint and ``latest`` as they were; the leftover temp directory is
removed on the next start. When ``latest`` nevertheless points at something broken (a disk
that lied about fsync, a human with ``rm``), :meth:`CheckpointManager.latest` falls back to
the newest checkpoint that verifies, and says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olm_cli.errors import CheckpointError
from olm_cli.rundir.atomic import fsync_dir, fsync_file, write_json_atomic
from olm_cli.rundir.ledger import now_iso, sha256_file

MANIFEST_FILENAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
LATEST_LINK = "latest"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-step-"
_TRASH_PREFIX = ".trash-step-"
_LINK_TMP_PREFIX = ".latest.tmp-"

log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    """The step number encoded in a checkpoint directory's name."""
    match = _STEP_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step-NNNNNNNN)")
    return int(match.group(1))


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a checkpoint's manifest; CheckpointError says what is wrong."""
    manifest_path = Path(path) / MANIFEST_FILENAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: {MANIFEST_FILENAME} is missing (incomplete checkpoint)"
        ) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: {MANIFEST_FILENAME} is unreadable: {exc}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), list)
        or not isinstance(manifest.get("step"), int)
    ):
        raise CheckpointError(f"{path}: {MANIFEST_FILENAME} is malformed")
    return manifest


@dataclass(frozen=True)
class RejectedCheckpoint:
    path: Path
    reason: str


@dataclass
class LatestChoice:
    """Which checkpoint a resume should load, and which ones were passed over and why."""

    path: Path | None
    rejected: list[RejectedCheckpoint] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [
            f"checkpoint {r.path.name} is unusable ({r.reason}); "
            + (f"falling back to {self.path.name}" if self.path else "no older checkpoint verifies")
            for r in self.rejected
        ]


class CheckpointManager:
    """Owns ``RUN/checkpoints/``: atomic save, verification, ``latest``, keep-K pruning.

    The caller (the engine) decides *what* goes into a checkpoint through the ``write``
    callback; this class decides *how* it becomes durable. Constructing one touches nothing
    on disk, so ``olm status`` can use it read-only.
    """

    def __init__(self, root: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    # ------------------------------------------------------------------ writing

    def save(
        self,
        step: int,
        write: Callable[[Path], object],
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Path:
        """Write, verify and publish checkpoint ``step``; return its final directory.

        On any failure the temp directory is removed and the previous checkpoint and
        ``latest`` are left untouched. An ``OSError`` (a full disk, say), or the way
        ``torch.save``/``safetensors`` report one, becomes a :class:`CheckpointError`;
        anything else (a bug in ``write``, Ctrl-C) propagates as is.
        """
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        name = checkpoint_name(step)
        tmp = self.root / f"{_TMP_PREFIX}{step:08d}"
        final = self.root / name
        trash = self.root / f"{_TRASH_PREFIX}{step:08d}"
        previous = self._latest_target()
        published = False  # final/ exists and holds our new checkpoint
        trashed = False  # an older final/ of the same step was moved to trash/
        linked = False  # latest was moved to final/
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
            write(tmp)
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "created": now_iso(),
                "metadata": dict(metadata or {}),
                "files": _describe_files(tmp),
            }
            write_json_atomic(tmp / MANIFEST_FILENAME, manifest)
            _fsync_tree(tmp)
            if final.exists():
                # Same step saved again (e.g. a resume from an older fallback reached it):
                # keep the old one aside until the new one is published.
                if trash.exists():
                    shutil.rmtree(trash)
                os.rename(final, trash)
                trashed = True
            os.rename(tmp, final)
            published = True
            fsync_dir(self.root)
            self.verify(final)
            self._replace_latest(name)
            linked = True
            fsync_dir(self.root)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp, ignore_errors=True)
                if linked:
                    self._restore_latest(previous)
                if published:
                    shutil.rmtree(final, ignore_errors=True)
                if trashed:
                    os.rename(trash, final)
            if isinstance(exc, OSError):
                raise CheckpointError(f"could not write checkpoint {name}: {exc}") from exc
            if _is_write_failure(exc):
                raise CheckpointError(
                    f"could not write checkpoint {name}: {exc}{_free_space_note(self.root)}"
                ) from exc
            raise
        if trashed:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune()
        return final

    def _restore_latest(self, previous: Path | None) -> None:
        if previous is None:
            (self.root / LATEST_LINK).unlink(missing_ok=True)
        else:
            self._replace_latest(previous.name)

    def _replace_latest(self, name: str) -> None:
        """Swap ``latest`` to ``name`` in one rename so readers never see it missing."""
        link_tmp = self.root / f"{_LINK_TMP_PREFIX}{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            link_tmp.unlink()
        try:
            os.symlink(name, link_tmp)  # relative: the run directory can be moved
            os.replace(link_tmp, self.root / LATEST_LINK)
        except BaseException:
            with contextlib.suppress(OSError):
                link_tmp.unlink()
            raise

    def prune(self) -> list[Path]:
        """Delete all but the newest ``keep`` complete checkpoints, never ``latest``'s target.

        Broken checkpoints do not count towards ``keep`` (they would push out good ones)
        and are deleted. So are checkpoints with a step beyond ``latest``'s: training
        resumed from an earlier one, so they belong to an abandoned future (e.g. a save
        that crashed after its rename, before ``latest`` moved). A failure here is logged,
        not raised: the new checkpoint is already safe and a full disk will be reported by
        the next save.
        """
        target = self._latest_target()
        limit = None
        if target is not None:
            try:
                self.verify(target)
                limit = step_of(target)
            except CheckpointError:
                target = None  # cannot tell which timeline is current; delete nothing newer
        complete: list[Path] = []
        doomed: list[Path] = []
        for path in reversed(self.list()):
            if path == target:
                complete.append(path)
                continue
            try:
                self.verify(path)
            except CheckpointError:
                doomed.append(path)
                continue
            if limit is not None and step_of(path) > limit:
                doomed.append(path)
            else:
                complete.append(path)
        keep = set(complete[: self.keep])
        if target is not None:
            keep.add(target)
        removed = []
        for path in sorted(set(complete) - keep, key=step_of) + doomed:
            try:
                shutil.rmtree(path)
                removed.append(path)
            except OSError as exc:
                log.warning("could not remove old checkpoint %s: %s", path, exc)
        return removed

    def cleanup_temp(self) -> list[Path]:
        """Remove what an interrupted save left behind; call once at start (under the lock).

        A ``.trash-step-N`` without ``step-N`` means a crash between moving an old
        checkpoint aside and publishing its replacement: the old one is put back.
        """
        if not self.root.is_dir():
            return []
        removed = []
        restored = False
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(_TRASH_PREFIX):
                original = self.root / f"step-{child.name[len(_TRASH_PREFIX) :]}"
                if not original.exists():
                    os.rename(child, original)
                    restored = True
                    continue
            if child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
            elif child.name.startswith(_LINK_TMP_PREFIX):
                child.unlink(missing_ok=True)
                removed.append(child)
        if removed or restored:
            fsync_dir(self.root)
        return removed

    # ------------------------------------------------------------------ reading

    def list(self) -> list[Path]:
        """Published checkpoint directories (complete or not), oldest step first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if _STEP_RE.match(p.name) and p.is_dir() and not p.is_symlink()
        ]
        return sorted(found, key=step_of)

    def verify(self, path: Path, deep: bool = False) -> None:
        """Raise :class:`CheckpointError` unless ``path`` matches its manifest.

        The default checks presence and sizes (cheap, catches truncation and partial
        copies); ``deep`` also re-hashes every file (reads the whole checkpoint).
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a directory")
        manifest = read_manifest(path)
        with contextlib.suppress(ValueError):
            if manifest["step"] != step_of(path):
                raise CheckpointError(
                    f"{path}: manifest says step {manifest['step']}, directory name disagrees"
                )
        for item in manifest["files"]:
            try:
                rel, size, digest = str(item["path"]), int(item["size"]), str(item["sha256"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: {MANIFEST_FILENAME} is malformed") from None
            file = path / rel
            try:
                actual = file.stat().st_size
            except FileNotFoundError:
                raise CheckpointError(f"{path}: {rel} is missing") from None
            if actual != size:
                raise CheckpointError(f"{path}: {rel} is {actual} bytes, manifest says {size}")
            if deep and sha256_file(file) != digest:
                raise CheckpointError(f"{path}: {rel} does not match its sha256 in the manifest")

    def resolve_latest(self, *, deep: bool = False) -> LatestChoice:
        """Pick the checkpoint to resume from without logging (``olm status`` uses this).

        ``latest``'s target if it verifies, else the newest checkpoint that does.
        """
        rejected: list[RejectedCheckpoint] = []
        tried: set[Path] = set()
        target = self._latest_target()
        link = self.root / LATEST_LINK
        if target is None and link.is_symlink():
            rejected.append(RejectedCheckpoint(link, f"points to missing {os.readlink(link)}"))
        candidates = ([target] if target is not None else []) + list(reversed(self.list()))
        for path in candidates:
            if path in tried:
                continue
            tried.add(path)
            try:
                self.verify(path, deep=deep)
            except CheckpointError as exc:
                rejected.append(RejectedCheckpoint(path, str(exc)))
                continue
            return LatestChoice(path, rejected)
        return LatestChoice(None, rejected)

    def latest(self, *, deep: bool = False) -> Path | None:
        """The checkpoint to resume from, warning about any broken one passed over."""
        choice = self.resolve_latest(deep=deep)
        for message in choice.warnings:
            log.warning("%s", message)
        return choice.path

    def _latest_target(self) -> Path | None:
        link = self.root / LATEST_LINK
        try:
            target = os.readlink(link)
        except OSError:
            return None
        path = self.root / target
        if not _STEP_RE.match(path.name) or not path.is_dir():
            return None
        return path


def _is_write_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is how a serializer reports an I/O failure (measured on a full tmpfs).

    ``torch.save(obj, path)`` raises ``RuntimeError("[enforce fail at inline_container.cc]
    unexpected pos ...")`` and ``save_pretrained`` (safetensors) raises ``SafetensorError("...
    I/O error: No space left on device")``; neither is an ``OSError`` nor carries an errno.
    """
    return isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError"


def _free_space_note(path: Path) -> str:
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return ""
    return f" ({free / 2**20:.0f} MiB free on the checkpoint disk)"


def _describe_files(directory: Path) -> list[dict[str, Any]]:
    files = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            full = Path(dirpath) / filename
            rel = full.relative_to(directory).as_posix()
            if rel == MANIFEST_FILENAME:
                continue
            files.append({"path": rel, "size": full.stat().st_size, "sha256": sha256_file(full)})
    return sorted(files, key=lambda f: f["path"])


def _fsync_tree(directory: Path) -> None:
    """fsync every file and directory: ``torch.save`` and friends do not fsync for us."""
    for dirpath, _dirnames, filenames in os.walk(directory, topdown=False):
        for filename in filenames:
            fsync_file(Path(dirpath) / filename)
        fsync_dir(Path(dirpath))
