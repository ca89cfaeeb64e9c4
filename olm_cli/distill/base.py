"""The contracts the engine relies on: a :class:`Distiller` adds a term to the loss, a
:class:`Regularizer` adds a penalty in weight space.

Both are Protocols (composition, not inheritance): any object with these methods plugs into the
training step, so a new strategy never has to touch the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

StoredLogits = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(values [B, L, k] float, indices [B, L, k] long, row_mask [B] bool) for a replayed batch."""


@runtime_checkable
class Distiller(Protocol):
    """Produces a distillation term that the engine mixes as ``alpha*ce + (1-alpha)*kd``."""

    name: str

    def begin_increment(self, model: torch.nn.Module) -> None:
        """Prepare the teacher for the increment about to be trained (snapshot, lazy load, checks)."""
        ...

    def loss(
        self,
        student_logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        stored: StoredLogits | None = None,
    ) -> torch.Tensor | None:
        """The T^2-scaled distillation term as a scalar, or None when there is nothing to distil."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class Regularizer(Protocol):
    """A penalty on the distance from the weights at the start of the increment."""

    name: str

    def begin_increment(self, model: torch.nn.Module) -> None:
        """Anchor theta* to the current trainable weights."""
        ...

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """Scalar penalty; zero at the anchor and before any anchor exists."""
        ...

    def end_increment(
        self, model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]]
    ) -> None:
        """Consolidate what the increment learned (EWC estimates its Fisher here)."""
        ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...
