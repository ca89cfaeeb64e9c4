"""CheckpointWriter: one write in flight, its result or its error collected by wait()."""

from __future__ import annotations

import os
import threading

import pytest

from olm_cli.rundir.async_writer import WRITER_NICENESS, CheckpointWriter


def test_background_job_runs_in_another_thread_while_the_caller_goes_on() -> None:
    writer: CheckpointWriter[str] = CheckpointWriter(background=True)
    release = threading.Event()
    ran_in: list[str] = []

    def job() -> str:
        ran_in.append(threading.current_thread().name)
        assert release.wait(timeout=10)
        return "published"

    writer.submit(job)
    assert writer.in_flight  # submit returned while the job is blocked
    release.set()
    assert writer.wait() == "published"
    assert ran_in == ["olm-checkpoint-writer"]
    assert not writer.in_flight
    assert writer.wait() is None  # collected once


def test_a_failed_write_is_raised_by_wait_once_and_the_writer_goes_on() -> None:
    writer: CheckpointWriter[str] = CheckpointWriter(background=True)

    def disk_full() -> str:
        raise OSError(28, "No space left on device")

    writer.submit(disk_full)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    assert writer.wait() is None
    writer.submit(lambda: "next")
    assert writer.wait() == "next"


def test_only_one_write_in_flight() -> None:
    writer: CheckpointWriter[int] = CheckpointWriter(background=True)
    release = threading.Event()
    writer.submit(lambda: int(release.wait(timeout=10)))
    with pytest.raises(RuntimeError, match="still in flight"):
        writer.submit(lambda: 2)
    release.set()
    assert writer.wait() == 1


def test_synchronous_writer_runs_the_job_inside_submit() -> None:
    writer: CheckpointWriter[str] = CheckpointWriter(background=False)
    ran_in: list[str] = []
    writer.submit(lambda: ran_in.append(threading.current_thread().name) or "done")
    assert ran_in == [threading.current_thread().name]
    assert writer.wait() == "done"

    def failing() -> str:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        writer.submit(failing)  # the synchronous path fails where it is called
    assert not writer.in_flight


@pytest.mark.skipif(not hasattr(os, "setpriority") or not hasattr(threading, "get_native_id"),
                    reason="per-thread nice values are a Linux feature")
def test_the_writer_thread_yields_the_cpu_to_training() -> None:
    """A background write runs niced, so on a busy machine the training thread keeps its core."""
    writer: CheckpointWriter[int] = CheckpointWriter(background=True)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    writer.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    assert writer.wait() == min(19, mine + WRITER_NICENESS)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller is untouched
