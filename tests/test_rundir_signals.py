"""GracefulStop: first signal requests a stop, second Ctrl-C interrupts, handlers restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from olm_cli.errors import EXIT_SIGINT, EXIT_SIGTERM
from olm_cli.rundir.signals import GracefulStop

REPO = Path(__file__).resolve().parents[1]


def test_sigterm_sets_flag_and_exit_code():
    with GracefulStop() as stop:
        assert (stop.requested, stop.signal, stop.exit_code) == (False, None, None)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
        assert stop.signal == signal.SIGTERM
        assert stop.exit_code == EXIT_SIGTERM == 143
        os.kill(os.getpid(), signal.SIGTERM)  # a second TERM does not kill mid-step
        assert stop.exit_code == EXIT_SIGTERM


def test_second_sigint_raises_keyboard_interrupt():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and stop.exit_code == EXIT_SIGINT == 130
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_previous_handlers_are_restored():
    seen: list[int] = []

    def previous(signum, frame):
        seen.append(signum)

    old = signal.signal(signal.SIGTERM, previous)
    try:
        with GracefulStop():
            assert signal.getsignal(signal.SIGTERM) is not previous
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, old)


LOOP = textwrap.dedent(
    """
    import sys, time
    from olm_cli.rundir.signals import GracefulStop
    with GracefulStop() as stop:
        print("ready", flush=True)
        step = 0
        while not stop.requested:
            step += 1          # one "training step"
            time.sleep(0.01)
        print(f"checkpoint at step {step}", flush=True)
    sys.exit(stop.exit_code)
    """
)


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, EXIT_SIGTERM), (signal.SIGINT, EXIT_SIGINT)]
)
def test_real_process_stops_at_step_boundary(signum: int, code: int):
    proc = subprocess.Popen(
        [sys.executable, "-c", LOOP],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == code
    assert out.startswith("checkpoint at step ")


def test_stop_notice_offers_ctrl_c_only_for_sigint():
    from olm_cli.rundir.signals import stop_notice

    term = stop_notice(signal.SIGTERM)
    assert term == "received SIGTERM: stopping after the current step and saving a checkpoint"
    assert "Ctrl-C" not in term  # systemd and cron cannot press anything
    assert stop_notice(signal.SIGINT).endswith("(press Ctrl-C again to stop immediately)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_first_signal_logs_its_notice_once(signum: int, caplog):
    from olm_cli.rundir.signals import stop_notice

    with caplog.at_level("WARNING"), GracefulStop():
        os.kill(os.getpid(), signum)
    assert [r.getMessage() for r in caplog.records] == [stop_notice(signum)]
