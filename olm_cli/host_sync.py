"""Keeping the accelerator ahead of the host: one device-to-host transfer per optimizer step.

Every ``float(loss)``, ``.item()``, ``.cpu()`` or ``if torch.isfinite(x):`` on a CUDA tensor
makes the host wait until the device has finished everything queued before it, so the next
micro-batch cannot be queued while the current one runs. The step therefore keeps its
statistics on the device (each micro-batch's objective, each sample's mean token loss) and
:func:`fetch_step` brings them to the host together with the clipped gradient norm in one
``tolist()`` of one small tensor, after clipping and before ``optimizer.step()``: the point where
the host must decide between stepping and skipping a non-finite batch. Host-to-device copies of
the batch go through pinned memory without blocking (:func:`to_device`).

:func:`sync_allowed` marks that one point for ``torch.cuda.set_sync_debug_mode("error")``
(``scripts/check_sync_free.py``); :class:`HostSyncCounter` counts the Python-visible transfers
on any device (the CPU test of the same property).
"""

from __future__ import annotations

import contextlib
import math
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def to_device(tensors: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """``tensors`` on ``device``; to CUDA through pinned memory, so the host does not wait for the copy."""
    if device.type != "cuda":
        return {name: tensor.to(device) for name, tensor in tensors.items()}
    return {name: tensor.pin_memory().to(device, non_blocking=True) for name, tensor in tensors.items()}


@dataclass
class AccumulatedBatch:
    """One optimizer step's statistics as the micro-batches left them: still on the device.

    ``losses`` holds each micro-batch's objective; ``row_losses`` each of this rank's samples'
    mean token loss, in the order of ``rows`` (their indices in the step's batch of ``samples``).
    """

    samples: int
    rows: list[int]
    losses: list[torch.Tensor] = field(default_factory=list)
    row_losses: list[torch.Tensor] = field(default_factory=list)
    new_logits: list[tuple[np.ndarray, np.ndarray]] | None = None

    def add(self, loss: torch.Tensor, row_loss: torch.Tensor) -> None:
        self.losses.append(loss.detach().float().reshape(1))
        self.row_losses.append(row_loss.detach().float().reshape(-1))


@dataclass(frozen=True)
class MeasuredStep:
    """What the host learns about a step in its one transfer."""

    loss: float  # the batch's objective: the sum of its micro-batches'
    bad_loss: float | None  # the first non-finite micro-batch objective, if there was one
    grad_norm: float  # before clipping
    per_sample: np.ndarray  # every sample's mean token loss (0 for samples another rank computed)


def fetch_step(batch: AccumulatedBatch, grad_norm: torch.Tensor | float) -> MeasuredStep:
    """The step's one device-to-host transfer: objectives, per-sample losses and gradient norm together."""
    on_device = isinstance(grad_norm, torch.Tensor)
    parts = [*batch.losses, *batch.row_losses]
    if on_device:
        assert isinstance(grad_norm, torch.Tensor)
        parts.append(grad_norm.detach().float().reshape(1))
    with sync_allowed():
        values: list[float] = torch.cat(parts).tolist()
    n_losses = len(batch.losses)
    losses = values[:n_losses]
    per_sample = np.zeros(batch.samples)
    per_sample[batch.rows] = values[n_losses : n_losses + len(batch.rows)]
    return MeasuredStep(
        loss=sum(losses),
        bad_loss=next((value for value in losses if not math.isfinite(value)), None),
        grad_norm=values[-1] if on_device else float(grad_norm),  # DeepSpeed reports a host float
        per_sample=per_sample,
    )


_allowed_depth = 0  # > 0 inside sync_allowed(); read by HostSyncCounter


@contextlib.contextmanager
def sync_allowed() -> Iterator[None]:
    """Suspend ``torch.cuda.set_sync_debug_mode`` for the one documented transfer of a step."""
    global _allowed_depth
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode:
        torch.cuda.set_sync_debug_mode(0)
    _allowed_depth += 1
    try:
        yield
    finally:
        _allowed_depth -= 1
        if mode:
            torch.cuda.set_sync_debug_mode(mode)


_TRANSFERS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


class HostSyncCounter:
    """Counts the calls that bring a tensor's values to the host (``with HostSyncCounter() as c``).

    On CUDA each of these waits for the device; on a CPU they are free, which is why a CPU
    test counts them instead of timing them. It sees Python-level calls only (``item``,
    ``tolist``, ``cpu``, ``numpy``, ``float()``, ``int()``, ``bool()`` / ``if tensor``); a
    kernel that syncs inside C++ (``nonzero``, boolean-mask indexing) needs the CUDA check.
    ``allowed`` counts those made inside :func:`sync_allowed` (the documented one). Set
    ``counting`` to False to ignore a stretch (on a CPU, host-side tensors look the same).
    """

    def __init__(self) -> None:
        self.counting = True
        self.count = 0
        self.allowed = 0
        self.where: list[str] = []
        self._saved: dict[str, Any] = {}
        self._busy = False

    def __enter__(self) -> HostSyncCounter:
        for name in _TRANSFERS:
            self._saved[name] = torch.Tensor.__dict__.get(name)
            setattr(torch.Tensor, name, self._counting(name, getattr(torch.Tensor, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, original)

    def _counting(self, name: str, method: Any) -> Any:
        counter = self

        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if counter._busy or not counter.counting:  # a transfer made through another (numpy() via cpu()) counts once
                return method(tensor, *args, **kwargs)
            counter._busy = True
            try:
                counter.count += 1
                counter.allowed += _allowed_depth > 0
                if not _allowed_depth:
                    caller = traceback.extract_stack(limit=2)[0]
                    counter.where.append(f"{name}() of a {tuple(tensor.shape)} tensor at {caller.filename}:{caller.lineno}")
                return method(tensor, *args, **kwargs)
            finally:
                counter._busy = False

        return counted
