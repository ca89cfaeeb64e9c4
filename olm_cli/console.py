"""The rich consoles olm prints through: pretty on a terminal, one line per message in a log.

When stdout is not a terminal (cron mails, ``>> train.log``, systemd's journal), rich assumes
80 columns and hard-wraps every longer message, so "increment complete … → PATH" loses its
path to the next line and grep finds neither half. Off a terminal the console therefore
never wraps (``soft_wrap``) and is as wide as any line it will print, so tables keep whole
paths too. On a terminal rich measures the real width and wraps as usual.
"""

from __future__ import annotations

import sys

from rich.console import Console

# Wider than any line olm prints; tables only take the width their content needs.
LOG_WIDTH = 100_000


def make_console(*, stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that wraps only when that stream is a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        terminal = False
    if terminal:
        return Console(stderr=stderr)
    return Console(stderr=stderr, soft_wrap=True, width=LOG_WIDTH)
