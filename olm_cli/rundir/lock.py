"""One olm process per run directory, safe against kill -9.

Two overlapping cron runs on one run directory would interleave checkpoints and double
train shards, so ``olm train`` holds ``RUN/.lock`` for its whole life. The lock itself is a
``flock`` on an open file descriptor: the kernel drops it when the process dies however it
dies, so a killed run never blocks the next night. The JSON inside the file (pid, host,
start time, command) is only information, for the error message and ``olm status``.

The file is never deleted: unlinking a flock'ed file lets a third process lock a fresh
inode while a second still holds the old one. Release truncates it instead, so holder info
left behind always means the previous holder died without releasing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from olm_cli.errors import LockHeldError
from olm_cli.rundir.ledger import now_iso

LOCK_FILENAME = ".lock"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a run directory."""

    pid: int
    host: str
    started: str
    command: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, text: str) -> LockHolder | None:
        """Parse the lock file; ``None`` when empty or unreadable (a holder mid-write)."""
        try:
            data = json.loads(text)
            return cls(
                pid=int(data["pid"]),
                host=str(data["host"]),
                started=str(data["started"]),
                command=str(data.get("command", "")),
            )
        except (ValueError, KeyError, TypeError):
            return None

    def is_alive(self) -> bool | None:
        """Whether the holder process exists; ``None`` if it ran on another host."""
        if self.host != socket.gethostname():
            return None
        return pid_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} since {self.started}"


def pid_alive(pid: int) -> bool:
    """Signal 0 probes existence; EPERM means it exists but belongs to another user."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_text(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


class RunLock:
    """Exclusive lock on a run directory, used as ``with RunLock(run_dir) as lock: ...``.

    Raises :class:`LockHeldError` (exit 75) naming the holder if another process has it.
    After entering, ``stale_holder`` is set when the previous holder died without releasing
    (e.g. kill -9); the caller prints ``lock.stale_message`` (this class only logs it at
    debug level, so that the notice appears once).
    """

    def __init__(self, run_dir: Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILENAME
        self.command = command if command is not None else shlex.join(sys.argv)
        self.holder: LockHolder | None = None
        self.stale_holder: LockHolder | None = None
        self._fd: int | None = None

    @property
    def stale_message(self) -> str | None:
        if self.stale_holder is None:
            return None
        return f"taking over stale lock from pid {self.stale_holder.pid} ({self.stale_holder.describe()})"

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask decides
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
            holder = LockHolder.from_json(_read_text(fd)) if busy else None
            os.close(fd)
            if not busy:
                raise
            who = holder.describe() if holder else "another process (holder info not written yet)"
            raise LockHeldError(
                f"run directory {self.run_dir} is locked by {who}; wait for it or stop it"
            ) from None
        try:
            previous = LockHolder.from_json(_read_text(fd))
            if previous is not None:
                # We got the flock, so whoever wrote this is gone (or its pid was reused).
                # The caller prints stale_message once; a warning here would say it twice.
                self.stale_holder = previous
                log.debug("%s", self.stale_message)
            self.holder = LockHolder(
                pid=os.getpid(), host=socket.gethostname(), started=now_iso(), command=self.command
            )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(self.holder.to_dict()) + "\n").encode("utf-8"))
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # closing drops the flock
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear holder info, then unlock; safe to call twice."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def read_holder(run_dir: Path) -> LockHolder | None:
    """The live holder of ``run_dir``'s lock, for ``olm status``; ``None`` if free.

    Deliberately does not probe with ``flock``: a probe, however brief, could make a cron
    run that starts at that instant fail with exit 75. Holder info naming a dead pid on this
    host is a stale leftover and reported as free; a holder on another host is trusted.
    """
    try:
        text = (Path(run_dir) / LOCK_FILENAME).read_text(encoding="utf-8")
    except OSError:
        return None
    holder = LockHolder.from_json(text)
    if holder is None or holder.is_alive() is False:
        return None
    return holder
