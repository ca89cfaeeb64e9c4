"""Checkpoints that are either complete or invisible.

A checkpoint is written into ``.tmp-step-N/``, described by ``MANIFEST.json`` (every
file's size and sha256), fsynced, renamed to ``step-N/`` and only then published by moving
the ``latest`` symlink with one atomic ``os.replace``. A crash or a full disk at any point
leaves the previous checkpoint and ``latest`` as they were; the leftover temp directory is
removed on the next start. When ``latest`` nevertheless points at something broken (a disk
that lied about fsync, a human with ``rm``, bytes flipped in place), the reader falls back to
the newest checkpoint that verifies, and says so.

Verifying has two depths. The cheap one (manifest, presence, sizes) reads no file, so a night
with nothing to do stays fast; the deep one re-hashes every file against the manifest and must
pass before a checkpoint is trained on, evaluated or merged. A checkpoint that verifies but
still cannot be loaded (written bad, by a bug or another version) is rejected the same way:
:class:`CheckpointFallback` walks back to older checkpoints and reports each rejection once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olm_cli.errors import CheckpointError, CheckpointLoadError
from olm_cli.rundir.atomic import (
    apply_umask,
    fsync_dir,
    fsync_tree,
    replace_symlink,
    write_json_atomic,
)
from olm_cli.rundir.ledger import now_iso, sha256_file

MANIFEST_FILENAME = "MANIFEST.json"
MANIFEST_FORMAT = 1
LATEST_LINK = "latest"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-step-"
_TRASH_PREFIX = ".trash-step-"
_LINK_TMP_PREFIX = f".{LATEST_LINK}.tmp-"  # replace_symlink's temporary link
# How torch.save reports a failed write (it raises neither OSError nor an errno).
_TORCH_WRITE_MARKERS = ("inline_container", "unexpected pos", "PytorchStreamWriter")

log = logging.getLogger(__name__)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    """The step number encoded in a checkpoint directory's name."""
    match = _STEP_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint directory (step-NNNNNNNN)")
    return int(match.group(1))


class CheckpointVerifyError(CheckpointError):
    """A checkpoint does not match its manifest; ``reason`` says how, without the path."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check a checkpoint's manifest; CheckpointVerifyError says what is wrong."""
    manifest_path = Path(path) / MANIFEST_FILENAME
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointVerifyError(path, f"{MANIFEST_FILENAME} is missing (incomplete checkpoint)") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointVerifyError(path, f"{MANIFEST_FILENAME} is unreadable: {exc}") from exc
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != MANIFEST_FORMAT
        or not isinstance(manifest.get("files"), list)
        or not isinstance(manifest.get("step"), int)
    ):
        raise CheckpointVerifyError(path, f"{MANIFEST_FILENAME} is malformed")
    return manifest


def verify_checkpoint(path: Path, *, deep: bool = False, hashed: Collection[str] = ()) -> None:
    """Raise :class:`CheckpointVerifyError` unless ``path`` matches its manifest.

    The default checks presence and sizes: it reads no file, so planning a night with nothing
    to do stays cheap, and it catches truncation and partial copies. ``deep`` also re-hashes
    every file (streamed in 1 MiB chunks), which catches bytes changed in place at the same
    size; it must pass before anything in the checkpoint is used. ``hashed`` names files to
    re-hash even when not ``deep``: small ones a caller is about to trust (the trainer state
    that planning reads).
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointVerifyError(path, "not a directory")
    manifest = read_manifest(path)
    with contextlib.suppress(ValueError):
        if manifest["step"] != step_of(path):
            raise CheckpointVerifyError(
                path, f"manifest says step {manifest['step']}, directory name disagrees"
            )
    for item in manifest["files"]:
        try:
            rel, size, digest = str(item["path"]), int(item["size"]), str(item["sha256"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointVerifyError(path, f"{MANIFEST_FILENAME} is malformed") from None
        file = path / rel
        try:
            actual = file.stat().st_size
        except FileNotFoundError:
            raise CheckpointVerifyError(path, f"{rel} is missing") from None
        if actual != size:
            raise CheckpointVerifyError(path, f"{rel} is {actual} bytes, manifest says {size}")
        if (deep or rel in hashed) and sha256_file(file) != digest:
            raise CheckpointVerifyError(path, f"{rel} does not match its sha256")


@dataclass(frozen=True)
class RejectedCheckpoint:
    """A checkpoint passed over, and why (a reason without the path, for one warning line)."""

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


class CheckpointFallback:
    """Walks back from ``latest`` as checkpoints prove unusable; reports each rejection once.

    Planning chooses with the cheap check; a closer look (re-hashing every file, loading the
    weights and optimizer) can still reject the choice. :meth:`reject` records that, and the
    next :meth:`choose` skips every checkpoint rejected so far. :meth:`warnings` is called
    once the choice has passed that closer look: one line per rejection not reported yet,
    naming the checkpoint the run falls back to. So a run whose every checkpoint is corrupt
    prints one error, not a trail of fallbacks that did not hold.
    """

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.chosen: Path | None = None
        self.rejected: list[RejectedCheckpoint] = []
        self._unreported: list[RejectedCheckpoint] = []

    def choose(self, *, deep: bool = False, hashed: Collection[str] = ()) -> Path | None:
        choice = self.manager.resolve_latest(
            deep=deep, hashed=hashed, skip={r.path for r in self.rejected}
        )
        self.rejected.extend(choice.rejected)
        self._unreported.extend(choice.rejected)
        self.chosen = choice.path
        return choice.path

    def reject(self, path: Path, reason: str) -> None:
        rejected = RejectedCheckpoint(Path(path), reason)
        self.rejected.append(rejected)
        self._unreported.append(rejected)

    def warnings(self) -> list[str]:
        """``checkpoint X is unusable (why); falling back to Y`` for each rejection not yet reported."""
        lines = LatestChoice(self.chosen, self._unreported).warnings
        self._unreported = []
        return lines

    def none_usable(self, advice: str = "") -> CheckpointError:
        """The error when every checkpoint was rejected: each one with its reason, in one line."""
        listed = "; ".join(f"{r.path.name} ({r.reason})" for r in self.rejected)
        return CheckpointError(
            f"no usable checkpoint in {self.manager.root}: {listed}" + (f". {advice}" if advice else "")
        )


@contextlib.contextmanager
def loading_checkpoint(
    path: Path, what: str, *, keep: tuple[type[BaseException], ...] = ()
) -> Iterator[None]:
    """Report any failure to load ``what`` from checkpoint ``path`` as CheckpointLoadError.

    The readers (transformers, ``torch.load``, safetensors, json) fail in dozens of ways on
    a bad file; whichever it is, the checkpoint is unusable and the caller falls back to an
    older one, so it becomes one error with a one-line reason, never a traceback. ``keep``
    lists errors that are about the recipe rather than the files (a replay snapshot written
    by another policy) and propagate unchanged, as does running out of memory.
    """
    try:
        yield
    except CheckpointLoadError:
        raise
    except keep:
        raise
    except Exception as exc:
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            raise
        raise CheckpointLoadError(path, f"cannot load {what} ({one_line(exc)})") from exc


def one_line(exc: BaseException) -> str:
    """A short, single-line account of ``exc``: torch's errors run to paragraphs of advice."""
    text = str(exc).strip()
    if "WeightsUnpickler error:" in text:  # torch.load(weights_only=True) on bytes it cannot unpickle
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().split("\n", 1)[0].strip()
        return f"not a valid torch file: {detail}" if detail else "not a valid torch file"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if not line or isinstance(exc, KeyError):
        line = f"{type(exc).__name__} {line}".strip()
    return line.split(". ", 1)[0][:300]


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

    def staged_path(self, step: int) -> Path:
        """Where :meth:`stage` puts checkpoint ``step`` until it is published (other ranks write into it too)."""
        return self._tmp_dir(step)

    def stage(self, step: int, write: Callable[[Path], object]) -> Path:
        """Start checkpoint ``step`` now: a fresh temp directory, ``write(tmp)`` run into it.

        For state that must be written at the step boundary, in the training thread, while
        the rest of the checkpoint is written later (``save(..., staged=True)``, maybe in
        another thread): the replay buffer's snapshot reads the live buffer. A failure removes
        the temp directory and is reported like :meth:`save` reports one.
        """
        name = checkpoint_name(step)
        tmp = self._tmp_dir(step)
        try:
            self._fresh_dir(tmp)
            write(tmp)
        except BaseException as exc:
            written = _tree_bytes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            error = self._write_error(name, exc, self._latest_target(), written)
            if error is None:
                raise
            raise error from exc
        return tmp

    def save(
        self,
        step: int,
        write: Callable[[Path], object],
        *,
        metadata: Mapping[str, Any] | None = None,
        staged: bool = False,
    ) -> Path:
        """Write, verify and publish checkpoint ``step``; return its final directory.

        On any failure the temp directory is removed and the previous checkpoint and
        ``latest`` are left untouched. An ``OSError`` (a full disk, say), or the way
        ``torch.save``/``safetensors`` report one, becomes a :class:`CheckpointError`;
        anything else (a bug in ``write``, Ctrl-C) propagates as is. ``staged``: the temp
        directory was begun by :meth:`stage` and ``write`` adds to what it holds.
        """
        name = checkpoint_name(step)
        tmp = self._tmp_dir(step)
        final = self.root / name
        trash = self.root / f"{_TRASH_PREFIX}{step:08d}"
        previous = self._latest_target()
        published = False  # final/ exists and holds our new checkpoint
        trashed = False  # an older final/ of the same step was moved to trash/
        linked = False  # latest was moved to final/
        try:
            if not staged:
                self._fresh_dir(tmp)
            elif not tmp.is_dir():
                raise FileNotFoundError(f"{tmp} was not staged")
            write(tmp)
            apply_umask(tmp)  # libraries write some files 0600 (safetensors); honour the umask
            manifest = {
                "format": MANIFEST_FORMAT,
                "step": step,
                "created": now_iso(),
                "metadata": dict(metadata or {}),
                "files": describe_files(tmp),
            }
            write_json_atomic(tmp / MANIFEST_FILENAME, manifest)
            fsync_tree(tmp)
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
            written = _tree_bytes(final if published else tmp)  # measured before cleaning up
            with contextlib.suppress(OSError):
                shutil.rmtree(tmp, ignore_errors=True)
                if linked:
                    self._restore_latest(previous)
                if published:
                    shutil.rmtree(final, ignore_errors=True)
                if trashed:
                    os.rename(trash, final)
            error = self._write_error(name, exc, previous, written)
            if error is None:
                raise
            raise error from exc
        if trashed:
            shutil.rmtree(trash, ignore_errors=True)
        self.prune()
        return final

    def _tmp_dir(self, step: int) -> Path:
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return self.root / f"{_TMP_PREFIX}{step:08d}"

    def _fresh_dir(self, tmp: Path) -> None:
        """An empty ``tmp`` (what a killed writer left there is removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    def _write_error(self, name: str, exc: BaseException, previous: Path | None, written: int) -> CheckpointError | None:
        """The one-line CheckpointError for a failed write of checkpoint ``name``; None for a bug or Ctrl-C."""
        failure = write_failure(exc)
        if failure is None:
            return None
        if is_no_space(exc):
            failure = f"No space left on device ({self._space_note(previous, written)})"
        return CheckpointError(f"could not write checkpoint {name}: {failure}")

    def _space_note(self, previous: Path | None, written: int) -> str:
        """``needs about X, Y free on ROOT``: what a full disk must make room for.

        The previous checkpoint's size is the best estimate of the next one's; what was
        written before the disk filled is a lower bound (some writers delete their partial
        file, so it may be near zero). The write failed, so whatever is free now (partial
        files removed) is a lower bound too, and is what the message falls back to.
        """
        before = _checkpoint_bytes(previous) if previous is not None else 0
        try:
            free: int | None = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        floor = max(written, free or 0)
        if before > floor:
            needs = f"needs about {format_bytes(before)}"
        elif free is None or written > free:
            needs = f"needs more than {format_bytes(written)}"
        else:
            return f"needs more than the {format_bytes(free)} free on {self.root}"
        return needs if free is None else f"{needs}, {format_bytes(free)} free on {self.root}"

    def _restore_latest(self, previous: Path | None) -> None:
        replace_symlink(self.root / LATEST_LINK, previous.name if previous is not None else None)

    def _replace_latest(self, name: str) -> None:
        """Swap ``latest`` to ``name`` in one rename so readers never see it missing."""
        replace_symlink(self.root / LATEST_LINK, name)

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

    def verify(self, path: Path, deep: bool = False, *, hashed: Collection[str] = ()) -> None:
        """Raise :class:`CheckpointVerifyError` unless ``path`` matches its manifest
        (see :func:`verify_checkpoint`)."""
        verify_checkpoint(path, deep=deep, hashed=hashed)

    def resolve_latest(
        self, *, deep: bool = False, hashed: Collection[str] = (), skip: Collection[Path] = ()
    ) -> LatestChoice:
        """Pick the checkpoint to resume from without logging (``olm status`` uses this).

        ``latest``'s target if it verifies, else the newest checkpoint that does. ``skip``
        holds checkpoints already rejected (they are neither tried nor reported again).
        """
        rejected: list[RejectedCheckpoint] = []
        tried: set[Path] = set(skip)
        target = self._latest_target()
        link = self.root / LATEST_LINK
        if target is None and link.is_symlink() and link not in tried:
            rejected.append(RejectedCheckpoint(link, f"points to missing {os.readlink(link)}"))
        candidates = ([target] if target is not None else []) + list(reversed(self.list()))
        for path in candidates:
            if path in tried:
                continue
            tried.add(path)
            try:
                self.verify(path, deep=deep, hashed=hashed)
            except CheckpointVerifyError as exc:
                rejected.append(RejectedCheckpoint(path, exc.reason))
                continue
            return LatestChoice(path, rejected)
        return LatestChoice(None, rejected)

    def step_back(self, path: Path) -> Path | None:
        """Move ``latest`` from ``path`` to the newest older checkpoint that verifies; return it.

        For weights that turned out to diverge right after they were saved: they are finite
        (or they would never have been written) but no run can continue from them. ``path``
        stays on disk until the next save prunes it (a step beyond ``latest``). None, and
        ``latest`` untouched, when there is no older checkpoint to go back to.
        """
        older = [p for p in self.list() if step_of(p) < step_of(path)]
        for candidate in reversed(older):
            try:
                self.verify(candidate)
            except CheckpointVerifyError:
                continue
            self._replace_latest(candidate.name)
            fsync_dir(self.root)
            return candidate
        return None

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


def write_failure(exc: BaseException) -> str | None:
    """One line describing a failed checkpoint or release write, or None if ``exc`` is not one (a bug, Ctrl-C).

    Measured on a full tmpfs: ``torch.save(obj, path)`` raises ``RuntimeError("[enforce fail
    at inline_container.cc:...] . unexpected pos N vs M")`` and ``save_pretrained``
    (safetensors) raises ``SafetensorError("... I/O error: No space left on device")``;
    neither is an ``OSError`` nor carries an errno.
    """
    if isinstance(exc, OSError):
        return str(exc)
    if isinstance(exc, RuntimeError) and any(m in str(exc) for m in _TORCH_WRITE_MARKERS):
        return one_line(exc)
    if type(exc).__name__ == "SafetensorError":
        return one_line(exc)
    return None


def is_no_space(exc: BaseException) -> bool:
    """A full disk, however the writer put it (torch's short write shows as ``unexpected pos``)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return "No space left" in str(exc) or "unexpected pos" in str(exc)


def format_bytes(count: float) -> str:
    """``12.3 MiB``: binary units, one decimal, for messages about disk space."""
    if count < 1024:
        return f"{int(count)} bytes"
    for unit in ("KiB", "MiB", "GiB"):
        count /= 1024
        if count < 1024:
            return f"{count:.1f} {unit}"
    return f"{count / 1024:.1f} TiB"


def _tree_bytes(directory: Path) -> int:
    """Bytes of the files under ``directory`` (0 when it is gone); never raises."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / filename).stat().st_size
    return total


def _checkpoint_bytes(path: Path) -> int:
    """A checkpoint's size from its manifest (what it took to write), else from the disk."""
    try:
        return sum(int(item["size"]) for item in read_manifest(path)["files"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return _tree_bytes(path)


def describe_files(directory: Path) -> list[dict[str, Any]]:
    """The manifest's ``files``: every file below ``directory`` (but the manifest) with size and sha256."""
    files = []
    for dirpath, _dirnames, filenames in os.walk(directory):
        for filename in filenames:
            full = Path(dirpath) / filename
            rel = full.relative_to(directory).as_posix()
            if rel == MANIFEST_FILENAME:
                continue
            files.append({"path": rel, "size": full.stat().st_size, "sha256": sha256_file(full)})
    return sorted(files, key=lambda f: f["path"])
