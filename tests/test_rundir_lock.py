"""RunLock with real processes: a held lock blocks, kill -9 frees it, stale info is reported."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from olm_cli.errors import EXIT_LOCKED, LockHeldError
from olm_cli.rundir.lock import LockHolder, RunLock, read_holder

REPO = Path(__file__).resolve().parents[1]

HOLDER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from olm_cli.rundir.lock import RunLock
    with RunLock(Path(sys.argv[1]), command="olm train --config r.yaml"):
        print("locked", flush=True)
        time.sleep(60)
    """
)


@pytest.fixture
def holder_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A child process that holds the run lock until killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER_SCRIPT, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


def test_second_holder_gets_lock_held_error_naming_the_holder(tmp_path: Path, holder_process):
    with pytest.raises(LockHeldError) as info:
        RunLock(tmp_path).acquire()
    message = str(info.value)
    assert message.startswith(f"run directory {tmp_path} is locked by pid {holder_process.pid}")
    assert f"on host {socket.gethostname()} since " in message
    assert message.endswith("; wait for it or stop it")
    assert "\n" not in message
    assert info.value.exit_code == EXIT_LOCKED

    holder = read_holder(tmp_path)
    assert holder is not None
    assert (holder.pid, holder.command) == (holder_process.pid, "olm train --config r.yaml")


def test_kill_9_frees_the_lock_and_the_takeover_is_reported(tmp_path: Path, holder_process, caplog):
    holder_process.send_signal(signal.SIGKILL)
    holder_process.wait(timeout=10)
    assert read_holder(tmp_path) is None  # dead pid on this host: not a live holder

    with caplog.at_level(logging.WARNING), RunLock(tmp_path, command="olm train") as lock:
        assert lock.stale_holder is not None
        assert lock.stale_holder.pid == holder_process.pid
        assert lock.stale_message is not None
        assert lock.stale_message.startswith(
            f"taking over stale lock from pid {holder_process.pid}"
        )
        assert read_holder(tmp_path) == lock.holder
    # The caller (olm train) prints stale_message; a warning from the lock too said it twice.
    assert "stale lock" not in caplog.text


def test_clean_release_leaves_no_stale_info(tmp_path: Path):
    with RunLock(tmp_path, command="first") as first:
        info = json.loads((tmp_path / ".lock").read_text())
        assert info["pid"] == os.getpid() and info["command"] == "first"
        assert first.holder is not None and first.holder.started == info["started"]
    assert (tmp_path / ".lock").read_text() == ""  # file kept, info cleared
    assert read_holder(tmp_path) is None
    with RunLock(tmp_path) as second:
        assert second.stale_holder is None


def test_lock_is_exclusive_within_one_process_too(tmp_path: Path):
    with RunLock(tmp_path), pytest.raises(LockHeldError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()


def test_lock_creates_the_run_directory(tmp_path: Path):
    run = tmp_path / "new" / "run"
    with RunLock(run):
        assert (run / ".lock").exists()


def test_read_holder_handles_missing_and_garbage(tmp_path: Path):
    assert read_holder(tmp_path / "nowhere") is None
    (tmp_path / ".lock").write_text("not json")
    assert read_holder(tmp_path) is None
    other = LockHolder(
        pid=1, host="some-other-host", started="2026-01-01T02:00:00+00:00", command=""
    )
    (tmp_path / ".lock").write_text(json.dumps(other.to_dict()))
    assert read_holder(tmp_path) == other  # cannot check another host's pids: trust it


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_lock_file_mode_follows_the_umask(tmp_path: Path, umask: int):
    previous = os.umask(umask)
    try:
        with RunLock(tmp_path, command="olm train"):
            mode = (tmp_path / ".lock").stat().st_mode & 0o777
    finally:
        os.umask(previous)
    assert mode == 0o666 & ~umask
