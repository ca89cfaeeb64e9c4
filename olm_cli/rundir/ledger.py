"""The shard ledger: which data files have been trained, which are waiting, which are bad.

Cron runs ``olm train`` every night while new shards land in a data directory. The ledger
(``RUN/ledger.json``) is how one night knows what the previous nights did: a shard is
trained exactly once, a shard that changes after training is reported instead of silently
trained again, and one unreadable shard is quarantined instead of failing every night.

Training is also keyed by content: the ledger keeps the sha256 of every byte sequence it has
ever trained (``trained``, hash -> first path), including content whose file was edited
afterwards. A file whose bytes are in that index, under a new name or after an edit and a
change back, is skipped with a reason naming the original path.

Crash semantics (see docs/run-directory.md): the copy of the ledger stored *inside* a
checkpoint is authoritative. The engine marks shards done in memory and those marks only
become durable together with the checkpoint that contains their training. On resume from
checkpoint C the ledger is restored from C's copy (:meth:`ShardLedger.resume`), so shards
finished after C are trained again from C's data position, and the final weights contain
every shard exactly once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from olm_cli.errors import CheckpointError
from olm_cli.rundir.atomic import write_json_atomic

LEDGER_FORMAT = 1
LEDGER_FILENAME = "ledger.json"
HASH_CHUNK_BYTES = 1 << 20


class ShardStatus(str, Enum):
    """Life cycle of one shard; values are what ledger.json stores."""

    PENDING = "pending"  # known, not trained yet
    IN_PROGRESS = "in_progress"  # an increment started it; a checkpoint holds its position
    DONE = "done"  # fully trained into a committed checkpoint
    QUARANTINED = "quarantined"  # unreadable or bad; ``reason`` says why
    CHANGED = "changed"  # content differs from what was trained; not retrained by default
    SKIPPED = "skipped"  # deliberately not trained (e.g. duplicate content)


_UNFINISHED = (ShardStatus.IN_PROGRESS, ShardStatus.PENDING)
# Content in these states is (or will be) in the weights, so a new file with the same
# bytes is a duplicate rather than new data.
_TRAINED_OR_QUEUED = (ShardStatus.PENDING, ShardStatus.IN_PROGRESS, ShardStatus.DONE)


def now_iso() -> str:
    """Local time with UTC offset: readable in cron logs and unambiguous across DST."""
    return datetime.now().astimezone().isoformat(timespec="seconds")


def sha256_file(path: Path | str) -> str:
    """Stream a file through sha256 in 1 MiB chunks so multi-GB shards never sit in memory.

    Opened non-blocking and checked after opening: a FIFO swapped in after the scan's stat
    would otherwise block the open forever, and a device would never end.
    """
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as fh:
        problem = file_kind_problem(os.fstat(fd).st_mode)
        if problem is not None:
            raise NotARegularFileError(problem)
        while chunk := fh.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class NotARegularFileError(OSError):
    """Raised instead of reading a FIFO, a device or a socket; the message is the reason."""


_FILE_KINDS = {
    stat.S_IFIFO: "FIFO",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFSOCK: "socket",
    stat.S_IFDIR: "directory",
}


def file_kind_problem(mode: int) -> str | None:
    """Why a file of this ``st_mode`` cannot be a shard, or ``None`` for a regular file.

    Reading a FIFO blocks until a writer appears and a device never ends, so such a file is
    quarantined from its stat alone and never opened for reading.
    """
    if stat.S_ISREG(mode):
        return None
    return f"not a regular file ({_FILE_KINDS.get(stat.S_IFMT(mode), 'unknown kind')})"


@dataclass
class ShardEntry:
    """One shard as the ledger knows it.

    ``size``/``mtime_ns`` are the stat of the file when ``sha256`` was computed; when they
    still match, the hash is trusted and the file is not read again (nightly scans of a
    large data directory stay cheap). ``position`` is an engine-defined cursor inside the
    shard (e.g. records consumed) so an ``in_progress`` shard resumes where the checkpoint
    left it. ``tokens`` counts every token trained from this path, across retrains.
    ``split_documents``/``skipped_documents`` count the documents over
    ``data.max_document_tokens`` in the last pass over the shard.
    """

    path: str
    size: int
    mtime_ns: int
    sha256: str
    status: ShardStatus = ShardStatus.PENDING
    tokens: int = 0
    increment: int | None = None
    position: int = 0
    reason: str | None = None
    first_seen: str = field(default_factory=now_iso)
    finished_at: str | None = None
    split_documents: int = 0
    skipped_documents: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardEntry:
        return cls(
            path=str(data["path"]),
            size=int(data["size"]),
            mtime_ns=int(data["mtime_ns"]),
            sha256=str(data["sha256"]),
            status=ShardStatus(data["status"]),
            tokens=int(data.get("tokens", 0)),
            increment=None if data.get("increment") is None else int(data["increment"]),
            position=int(data.get("position", 0)),
            reason=data.get("reason"),
            first_seen=str(data.get("first_seen", "")),
            finished_at=data.get("finished_at"),
            split_documents=int(data.get("split_documents", 0)),
            skipped_documents=int(data.get("skipped_documents", 0)),
        )


@dataclass
class ScanResult:
    """What a scan found, for the engine to act on and the CLI to report.

    ``pending`` is the trainable work in the order it should be trained: shards already
    ``in_progress`` (resumed from a checkpoint) first, then ``pending``, each sorted by path
    so two runs over the same directory make the same choices. ``changed``: trained shards
    whose bytes changed, left untrained (reported every scan). ``duplicates``: files
    skipped by this scan because their bytes are already trained or queued (a new name, or
    an edit changed back). ``unreadable``: quarantined by this scan (unreadable, not a
    regular file, a symlink loop). ``requeued``: back to pending because their bytes changed (quarantined,
    skipped) or ``retrain_changed`` was set. ``missing``: pending/in-progress shards whose
    file is gone.
    """

    pending: list[ShardEntry] = field(default_factory=list)
    new: list[ShardEntry] = field(default_factory=list)
    changed: list[ShardEntry] = field(default_factory=list)
    duplicates: list[ShardEntry] = field(default_factory=list)
    unreadable: list[ShardEntry] = field(default_factory=list)
    requeued: list[ShardEntry] = field(default_factory=list)
    missing: list[ShardEntry] = field(default_factory=list)


def shard_key(path: Path | str) -> Path:
    """The absolute path a shard is known by: symlinks resolved for a regular file.

    A link whose target is not a regular file (a device, a FIFO, a loop, nothing) keeps its
    own name, so the quarantine report names what the operator put in the folder rather
    than ``/dev/zero``.
    """
    absolute = Path(os.path.abspath(path))
    try:
        if stat.S_ISREG(os.stat(absolute).st_mode):
            return absolute.resolve()
    except OSError:
        pass  # missing, a loop, no permission: the scan reports it
    try:
        return absolute.parent.resolve() / absolute.name  # the folder's links still resolve
    except (OSError, RuntimeError):  # RuntimeError: a loop above it (Python < 3.13)
        return absolute


def _key(path: Path | str) -> str:
    return str(shard_key(path))


class ShardLedger:
    """The persisted table of shards for one run directory."""

    def __init__(self, path: Path, entries: Sequence[ShardEntry] = (), increment: int = 0) -> None:
        self.path = Path(path)
        self._entries: dict[str, ShardEntry] = {e.path: e for e in entries}
        self._increment = increment
        # sha256 -> the first path it was trained from: every content ever (partly) trained,
        # kept when the file later changes, so the same bytes are never trained twice.
        self._trained: dict[str, str] = {}
        self._index_entries()
        # Paths seen by the last scan; plan() only offers shards that exist right now.
        self._present: set[str] | None = None

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, path: Path) -> ShardLedger:
        """Read ``path``; a missing file is a fresh run, a corrupt one is an error.

        A corrupt ledger is never silently replaced by an empty one: that would retrain
        every shard and double their weight in the model.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path)
        except OSError as exc:
            raise CheckpointError(f"cannot read shard ledger {path}: {exc}") from exc
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(
                f"shard ledger {path} is corrupt ({exc}); restore it from the `ledger` key of the "
                "latest checkpoint's trainer_state.json or move it away to start over"
            ) from exc
        ledger = cls(path)
        ledger._load_state(state, source=str(path))
        return ledger

    @classmethod
    def resume(cls, path: Path, checkpoint_state: Mapping[str, Any] | None) -> ShardLedger:
        """Return the ledger that matches the weights the engine is about to load.

        ``checkpoint_state`` is the :meth:`state_dict` stored inside the checkpoint being
        resumed (``None`` when there is no checkpoint). It wins over ``RUN/ledger.json``,
        which is not even read: shards marked done after that checkpoint was written are
        not in its weights and must be trained again, and a corrupt view file must not
        block a resume. Without a checkpoint nothing is in the weights, so every shard the
        file calls ``in_progress``/``done``/``changed`` goes back to ``pending``.
        """
        if checkpoint_state is not None:
            ledger = cls(path)
            ledger._load_state(checkpoint_state, source="the checkpoint's ledger")
            return ledger
        ledger = cls.load(path)
        ledger._trained = {}  # nothing is in the weights
        for entry in ledger._entries.values():
            if entry.status in (ShardStatus.IN_PROGRESS, ShardStatus.DONE, ShardStatus.CHANGED):
                entry.status = ShardStatus.PENDING
                entry.tokens = 0
                entry.position = 0
                entry.reason = None
                entry.finished_at = None
                entry.split_documents = entry.skipped_documents = 0
        return ledger

    def save(self) -> None:
        """Atomically write ``RUN/ledger.json``.

        Call it after a checkpoint is committed (``latest`` moved): the file is the view
        ``olm status`` reads; the checkpoint copy is what a resume trusts.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": LEDGER_FORMAT,
            "increment": self._increment,
            "shards": [e.to_dict() for e in self.entries],
            "trained": dict(sorted(self._trained.items())),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace everything with ``state`` exactly (entries, statuses, counters)."""
        self._load_state(state, source="ledger state")

    def _load_state(self, state: Any, *, source: str) -> None:
        try:
            if not isinstance(state, Mapping):
                raise TypeError("top level is not an object")
            fmt = state.get("format", LEDGER_FORMAT)
            if fmt != LEDGER_FORMAT:
                raise ValueError(f"unsupported format {fmt!r} (this olm reads {LEDGER_FORMAT})")
            entries = [ShardEntry.from_dict(item) for item in state.get("shards", [])]
            increment = int(state.get("increment", 0))
            trained = {str(k): str(v) for k, v in dict(state.get("trained", {})).items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"shard ledger {source} is corrupt: {exc!r}") from exc
        self._entries = {e.path: e for e in entries}
        self._increment = increment
        self._trained = trained
        self._index_entries()
        self._present = None

    def _index_entries(self) -> None:
        """Add the content of started and finished entries to the trained index.

        Ledgers written before the index existed get it rebuilt from their entries (the
        trained hash of an entry that is ``changed`` by then is not recoverable).
        """
        for entry in self._entries.values():
            if entry.status in (ShardStatus.IN_PROGRESS, ShardStatus.DONE):
                self._remember_trained(entry)

    def _remember_trained(self, entry: ShardEntry) -> None:
        if entry.sha256:
            self._trained.setdefault(entry.sha256, entry.path)

    # ------------------------------------------------------------------ scanning

    def scan(self, shard_paths: Sequence[Path], *, retrain_changed: bool = False) -> ScanResult:
        """Reconcile the ledger with the shard files that exist now.

        New files become ``pending`` (or ``skipped`` if their bytes duplicate a shard that
        is queued, or content ever trained). A trained shard whose bytes changed becomes
        ``changed`` and is reported, not retrained, unless ``retrain_changed``; if its new
        bytes are content already trained (an edit changed back, a file moved over another)
        it is ``skipped`` instead, whatever ``retrain_changed`` says. A quarantined or skipped
        shard whose bytes changed is reconsidered, since that verdict was about the old
        bytes. Unreadable files, and anything that is not a regular file (never opened), are
        quarantined so one bad file does not fail every night.
        """
        result = ScanResult()
        present: set[str] = set()
        by_hash = {
            e.sha256: e
            for e in self._entries.values()
            if e.status in _TRAINED_OR_QUEUED and e.sha256
        }
        for key in sorted({_key(p) for p in shard_paths}):
            try:
                st = os.stat(key)
            except FileNotFoundError:
                if os.path.islink(key):
                    self._record_unreadable(key, None, "broken symlink", result)
                continue  # vanished between listing and scan: simply not present
            except OSError as exc:
                self._record_unreadable(key, None, _os_reason(exc), result)
                continue
            kind_problem = file_kind_problem(st.st_mode)
            if kind_problem is not None:
                self._record_unreadable(key, st, kind_problem, result)
                continue
            present.add(key)
            entry = self._entries.get(key)
            if (
                entry is not None
                and entry.sha256
                and (entry.size, entry.mtime_ns) == (st.st_size, st.st_mtime_ns)
            ):
                continue  # unchanged since last hashed
            try:
                digest = sha256_file(key)
            except OSError as exc:
                self._record_unreadable(key, st, _os_reason(exc), result)
                continue
            if entry is None:
                entry = ShardEntry(
                    path=key, size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=digest
                )
                self._entries[key] = entry
                result.new.append(entry)
                self._dedupe(entry, by_hash, result)
                continue
            old = entry.sha256
            entry.size, entry.mtime_ns, entry.sha256 = st.st_size, st.st_mtime_ns, digest
            if digest == old:
                continue  # touched, same bytes
            if self._skip_if_trained(entry, result):
                continue
            trained_here = entry.path in self._trained.values()
            if entry.status in (ShardStatus.IN_PROGRESS, ShardStatus.DONE) or (
                trained_here and entry.status in (ShardStatus.QUARANTINED, ShardStatus.SKIPPED)
            ):
                entry.status = ShardStatus.CHANGED
                entry.reason = (
                    f"content changed after training (sha256 {old[:12]} -> {digest[:12]})"
                )
            elif entry.status in (ShardStatus.QUARANTINED, ShardStatus.SKIPPED):
                entry.status = ShardStatus.PENDING
                entry.reason = None
                entry.position = 0
                result.requeued.append(entry)
                self._dedupe(entry, by_hash, result)
            # PENDING: nothing trained yet, the new hash is simply recorded.
            # CHANGED: stays changed; reason keeps naming the hash that was trained.

        for entry in self.entries:
            if entry.status is not ShardStatus.CHANGED:
                continue
            if retrain_changed and entry.path in present:
                entry.status = ShardStatus.PENDING
                entry.reason = None
                entry.position = 0
                entry.finished_at = None
                result.requeued.append(entry)
            else:
                result.changed.append(entry)

        self._present = present
        result.pending = self._unfinished(present)
        result.missing = [
            e for e in self.entries if e.status in _UNFINISHED and e.path not in present
        ]
        return result

    def _dedupe(
        self, entry: ShardEntry, by_hash: dict[str, ShardEntry], result: ScanResult
    ) -> None:
        if self._skip_if_trained(entry, result):
            return
        original = by_hash.get(entry.sha256)
        if original is not None and original.path != entry.path:
            entry.status = ShardStatus.SKIPPED
            entry.reason = f"same content as {original.path}"
            result.duplicates.append(entry)
        else:
            by_hash[entry.sha256] = entry

    def _skip_if_trained(self, entry: ShardEntry, result: ScanResult) -> bool:
        """Skip ``entry`` when its current bytes were trained before (here or elsewhere)."""
        original = self.trained_from(entry.sha256)
        if original is None:
            return False
        entry.status = ShardStatus.SKIPPED
        entry.position = 0
        where = "this path, before it was edited" if original == entry.path else original
        entry.reason = f"same content as {where}, already trained (sha256 {entry.sha256[:12]})"
        result.duplicates.append(entry)
        return True

    def _record_unreadable(
        self, key: str, st: os.stat_result | None, problem: str, result: ScanResult
    ) -> None:
        entry = self._entries.get(key)
        reason = problem
        if entry is None:
            # Empty sha256 means "never hashed": the next scan retries instead of trusting
            # the stat, so fixing permissions (which does not touch mtime) is enough.
            entry = ShardEntry(
                path=key,
                size=st.st_size if st else 0,
                mtime_ns=st.st_mtime_ns if st else 0,
                sha256="",
                status=ShardStatus.QUARANTINED,
                reason=reason,
            )
            self._entries[key] = entry
            result.new.append(entry)
            result.unreadable.append(entry)
        elif entry.status in _UNFINISHED:
            entry.status = ShardStatus.QUARANTINED
            entry.reason = reason
            entry.sha256 = ""
            result.unreadable.append(entry)

    def _unfinished(self, present: set[str] | None) -> list[ShardEntry]:
        def usable(e: ShardEntry) -> bool:
            return present is None or e.path in present

        started = [e for e in self.entries if e.status is ShardStatus.IN_PROGRESS and usable(e)]
        waiting = [e for e in self.entries if e.status is ShardStatus.PENDING and usable(e)]
        return started + waiting

    def plan(self, max_shards: int | None = None) -> list[ShardEntry]:
        """The shards this increment should train, in order (in_progress first).

        After a :meth:`scan`, only shards whose files were present are offered.
        """
        if max_shards is not None and max_shards < 1:
            raise ValueError(f"max_shards must be at least 1 or None, got {max_shards}")
        work = self._unfinished(self._present)
        return work if max_shards is None else work[:max_shards]

    # ------------------------------------------------------------------ transitions

    def start_increment(self) -> int:
        """Number the increment that is about to train (1, 2, ...).

        The counter lives in the ledger, so it is also rewound by a resume: an increment
        that crashed before its first checkpoint reuses its number.
        """
        self._increment += 1
        return self._increment

    def mark_in_progress(self, path: Path | str, increment: int) -> ShardEntry:
        entry = self.get(path)
        entry.status = ShardStatus.IN_PROGRESS
        entry.increment = increment
        self._remember_trained(entry)
        return entry

    def add_tokens(self, path: Path | str, n: int, *, position: int | None = None) -> ShardEntry:
        """Count tokens trained from a shard and, optionally, move its resume cursor."""
        entry = self.get(path)
        entry.tokens += int(n)
        if position is not None:
            entry.position = int(position)
        return entry

    def mark_done(
        self,
        path: Path | str,
        tokens: int = 0,
        increment: int | None = None,
        *,
        long_documents: Mapping[str, int] | None = None,
    ) -> ShardEntry:
        """Finish a shard; ``tokens`` are added to what :meth:`add_tokens` already counted.

        ``long_documents`` (``{"split": n, "skipped": n}``, from the block stream) records the
        documents over the length cap, so a skip is visible in ``olm status`` and the file.
        Only durable once the checkpoint containing this shard's training is committed:
        call this before writing the checkpoint so its ledger copy includes it.
        """
        entry = self.get(path)
        entry.tokens += int(tokens)
        if increment is not None:
            entry.increment = increment
        if long_documents is not None:
            entry.split_documents = int(long_documents.get("split", 0))
            entry.skipped_documents = int(long_documents.get("skipped", 0))
        entry.status = ShardStatus.DONE
        entry.reason = None
        entry.finished_at = now_iso()
        self._remember_trained(entry)
        return entry

    def quarantine(self, path: Path | str, reason: str) -> ShardEntry:
        """Take a shard out of training until its content changes."""
        entry = self.get(path)
        entry.status = ShardStatus.QUARANTINED
        entry.reason = reason
        entry.finished_at = now_iso()
        return entry

    def skip(self, path: Path | str, reason: str) -> ShardEntry:
        """Deliberately never train a shard (until its content changes)."""
        entry = self.get(path)
        entry.status = ShardStatus.SKIPPED
        entry.reason = reason
        return entry

    # ------------------------------------------------------------------ queries

    def get(self, path: Path | str) -> ShardEntry:
        key = _key(path)
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"shard {key} is not in the ledger {self.path}") from None

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, Path)) and _key(path) in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ShardEntry]:
        return iter(self.entries)

    @property
    def entries(self) -> list[ShardEntry]:
        """All entries sorted by path (the order ledger.json uses)."""
        return [self._entries[k] for k in sorted(self._entries)]

    @property
    def increment(self) -> int:
        """Number of the last increment started (0 before the first)."""
        return self._increment

    def trained_from(self, sha256: str) -> str | None:
        """The first path content with this hash was trained from, or ``None``."""
        return self._trained.get(sha256)

    @property
    def total_tokens(self) -> int:
        return sum(e.tokens for e in self._entries.values())

    def counts(self) -> dict[str, int]:
        """Shards per status, every status present (zeros included) for stable JSON output."""
        counts = {s.value: 0 for s in ShardStatus}
        for entry in self._entries.values():
            counts[entry.status.value] += 1
        return counts


def _os_reason(exc: OSError) -> str:
    """A quarantine reason for an OS error: loops by name, the rest as the OS words them."""
    if isinstance(exc, NotARegularFileError):
        return str(exc)
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    return f"cannot read: {exc.strerror or exc}"
