"""The distillation contract: a :class:`Distiller` adds a term to the loss.

A Protocol (composition, not inheritance): any object with these members plugs into the
training step, so a new distiller never touches the engine. ``method: none`` builds
:class:`NoDistiller`, so the step never asks whether there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

StoredLogits = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(values [B, L, k] float, indices [B, L, k] long, row_mask [B] bool) for a replayed batch."""


@dataclass(frozen=True)
class IncrementStart:
    """What the engine tells every part when an increment begins or resumes."""

    increment: int  # 1, 2, ...
    resuming: bool  # continuing an interrupted increment from a mid-increment checkpoint
    from_random_init: bool  # the weights are a from-scratch initialisation nothing has trained yet


@runtime_checkable
class Distiller(Protocol):
    """Produces a distillation term that the engine mixes as ``alpha*ce + (1-alpha)*kd``."""

    name: str
    needs_stored_logits: bool  # the step hands replayed samples' stored top-k logits to loss()

    def begin_increment(self, model: torch.nn.Module, start: IncrementStart) -> None:
        """Prepare the teacher for the increment about to be trained (snapshot, load, checks)."""
        ...

    def loss(
        self,
        student_logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        stored: StoredLogits | None = None,
    ) -> torch.Tensor | None:
        """The T^2-scaled distillation term as a scalar, or None when there is nothing to distil."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoDistiller:
    """``distill.method: none``: plain cross-entropy."""

    name = "none"
    needs_stored_logits = False

    def __init__(self, config: Any = None, context: Any = None) -> None:
        pass

    def begin_increment(self, model: torch.nn.Module, start: IncrementStart) -> None:
        pass

    def loss(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor],
             stored: StoredLogits | None = None) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
