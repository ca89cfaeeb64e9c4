"""One checkpoint write at a time, in a background thread or inline.

Writing a checkpoint (serialising, hashing every file for the manifest, fsync) takes seconds
for a model of 100M+ parameters; training need not wait for it. The engine copies what the
checkpoint holds to host memory at the step boundary, hands :class:`CheckpointWriter` a job that
writes and publishes that copy, and carries on. The job's outcome is collected by :meth:`wait`,
which the engine calls before anything that must see it: the next checkpoint, the end of the
increment, a stop, an error. So at most one write is in flight, ``latest`` moves in step order,
and a failed write (a full disk) is raised in the training thread as the error it is.

The writer thread runs at a lower CPU priority (nice +10 on Linux): where training and writing
compete for cores (a small CPU-only machine) training keeps its speed and the write takes
longer; measured on 2 cores (scripts/bench_checkpoint.py), without it the steps that ran during
a 135M checkpoint's write lost more time than a synchronous write costs.

Nothing here changes crash-safety: the job publishes through ``CheckpointManager.save``, so a
process killed mid-write leaves the previous checkpoint as ``latest``, as a synchronous write would.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class CheckpointWriter(Generic[T]):
    """Runs write jobs one at a time; :meth:`wait` returns a finished job's result or raises its error.

    With ``background=False`` a job runs inside :meth:`submit` (the synchronous path): its
    error propagates from there and :meth:`wait` returns its result. With ``background=True``
    it runs in a fresh non-daemon thread, so an interpreter that exits while a write is in
    flight finishes it rather than abandoning it half-way (either way the previous checkpoint
    stays valid).
    """

    def __init__(self, *, background: bool) -> None:
        self.background = background
        self._thread: threading.Thread | None = None
        self._done = False
        self._result: T | None = None
        self._error: BaseException | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a submitted job has not been collected by :meth:`wait` yet."""
        return self._thread is not None or self._done

    def submit(self, job: Callable[[], T]) -> None:
        """Start ``job``; the previous one must have been collected with :meth:`wait`."""
        if self.in_flight:
            raise RuntimeError("a checkpoint write is still in flight: wait() for it before submitting another")
        if not self.background:
            self._result, self._done = job(), True
            return
        thread = threading.Thread(target=self._run, args=(job,), name="olm-checkpoint-writer")
        self._thread = thread
        thread.start()

    def _run(self, job: Callable[[], T]) -> None:
        _lower_this_threads_priority()
        try:
            self._result = job()
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> T | None:
        """Block until the job in flight ends; its result (None when there was none), or its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._done = True
        if not self._done:
            return None
        result, error = self._result, self._error
        self._done, self._result, self._error = False, None, None
        if error is not None:
            raise error
        return result


# How much lower than training the writer thread runs (a nice increment: 0 to 19).
WRITER_NICENESS = 10


def _lower_this_threads_priority() -> None:
    """Let the training thread win when the two compete for a core: the write only has to end
    before the next checkpoint. On Linux a thread is a task with its own nice value; elsewhere
    (or when not permitted) this does nothing."""
    with contextlib.suppress(AttributeError, OSError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + WRITER_NICENESS)
