"""Stop at a step boundary when asked, so an interrupted run resumes cleanly.

systemd (``systemctl stop``, shutdown) sends SIGTERM; a person at a terminal presses
Ctrl-C. Dying mid-step would lose everything since the last checkpoint, so the first signal
only raises a flag; the engine checks it after each optimizer step, writes a checkpoint and
exits with 143 (SIGTERM) or 130 (SIGINT). A second Ctrl-C means "now": it raises
KeyboardInterrupt at once (the checkpoint machinery still cleans up its temp directory).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from olm_cli.errors import EXIT_SIGINT, EXIT_SIGTERM

log = logging.getLogger(__name__)

_Handler = Callable[[int, FrameType | None], Any] | int | None

_EXIT_CODES = {signal.SIGTERM: EXIT_SIGTERM, signal.SIGINT: EXIT_SIGINT}


def stop_notice(signum: int) -> str:
    """The one log line that acknowledges a first stop signal.

    Only Ctrl-C has a "press it again" meaning: SIGTERM comes from systemd, cron or ``kill``,
    where nobody can press anything, so its notice carries no such hint.
    """
    name = signal.Signals(signum).name
    notice = f"received {name}: stopping after the current step and saving a checkpoint"
    if signum == signal.SIGINT:
        notice += " (press Ctrl-C again to stop immediately)"
    return notice


class GracefulStop:
    """``with GracefulStop() as stop: ... if stop.requested: checkpoint and leave``.

    Handlers are installed only in the main thread (Python allows nothing else); elsewhere
    the context is inert and says so in the log. Previous handlers are restored on exit.
    """

    def __init__(self) -> None:
        self.requested = False
        self.signal: int | None = None
        self._previous: dict[int, _Handler] = {}

    @property
    def exit_code(self) -> int | None:
        """143 after SIGTERM, 130 after SIGINT, ``None`` if no stop was requested."""
        return None if self.signal is None else _EXIT_CODES.get(signal.Signals(self.signal))

    def request(self, signum: int) -> None:
        """Record a stop request as if ``signum`` arrived (also handy for tests and callers)."""
        self.requested = True
        self.signal = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if not self.requested:
            self.request(signum)
            log.warning("%s", stop_notice(signum))
            return
        if signum == signal.SIGINT:
            self.signal = signum
            raise KeyboardInterrupt
        log.warning("received %s again: already stopping after the current step", name)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            log.warning("GracefulStop outside the main thread: signals are not intercepted")
            return self
        for signum in _EXIT_CODES:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for signum, previous in self._previous.items():
            # None means a handler installed from C; the default is the closest we can restore.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()
