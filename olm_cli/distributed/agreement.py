"""Decisions every rank takes together: a stop signal or the time budget, seen at different steps.

A SIGTERM may reach one rank only (a scheduler preempting one node, a ``kill`` of one pid), and
the time budget is read from each rank's own clock. Acting on its own view, one rank would go
and write a checkpoint (a collective) while the others enter the next forward (another
collective): every rank would then wait for ever. So once per step the ranks agree, with one
all-reduce (MAX) of two small integers, and every rank takes the branch the most urgent one
asks for. A rank that did not see the signal adopts it, so every rank exits with the same code.

The all-reduce runs on a gloo group of its own, on host integers: under NCCL it costs no
device synchronisation. With one process nothing is exchanged.
"""

from __future__ import annotations

import signal
from typing import Any

import torch
import torch.distributed as dist

_groups: dict[str, Any] = {}


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _host_group() -> Any:
    """The default group when it is gloo already, else a gloo group over the same ranks (made once)."""
    if dist.get_backend() == "gloo":
        return None
    if "gloo" not in _groups:
        _groups["gloo"] = dist.new_group(backend="gloo")  # a collective: every rank reaches here together
    return _groups["gloo"]


def agree_max(values: list[int]) -> list[int]:
    """The element-wise maximum of ``values`` over every rank (``values`` itself with one process)."""
    if _world() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=_host_group())
    return [int(v) for v in tensor.tolist()]


def agree_to_stop(stop: Any, *, over_budget: bool = False) -> tuple[bool, bool]:
    """Agree on a stop signal and the time budget: (stop now, the budget is spent), the same on every rank.

    ``stop`` is the rank's :class:`~olm_cli.rundir.GracefulStop` (or None). When any rank was
    signalled, every rank's ``stop`` records that signal afterwards (the highest number when
    ranks saw different ones), so ``stop.exit_code`` agrees everywhere. Callers act on the
    returned values, never on ``stop.requested`` read again: a signal arriving after the
    agreement is acted on at the next one, by every rank.
    """
    requested = stop is not None and bool(stop.requested)  # read once
    signum = int(getattr(stop, "signal", None) or signal.SIGTERM) if requested else 0
    agreed_signal, agreed_budget = agree_max([signum, int(over_budget)])
    if stop is not None and agreed_signal != signum:  # another rank was signalled (or with another signal)
        stop.request(agreed_signal)
    return bool(agreed_signal), bool(agreed_budget)
