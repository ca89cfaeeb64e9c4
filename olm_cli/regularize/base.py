"""The regulariser contract: a :class:`Regularizer` adds a penalty in weight space.

A Protocol (composition, not inheritance): any object with these members plugs into the
training step. ``regularize.method: none`` builds :class:`NoRegularizer`, so the step never
asks whether there is one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch

Batch = dict[str, torch.Tensor]
ConsolidationData = Callable[[int], list[Batch]]
"""``data(n)``: up to ``n`` batches to consolidate on (replayed samples if any, else the increment's data)."""


@runtime_checkable
class Regularizer(Protocol):
    """A penalty on the distance from an anchor theta* (the weights after the previous increment)."""

    name: str

    def begin_increment(self, model: torch.nn.Module) -> None:
        """A new increment starts from ``model`` (not called when an increment resumes)."""
        ...

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """Scalar penalty, or None when there is nothing to pull toward yet."""
        ...

    def end_increment(self, model: torch.nn.Module, data: ConsolidationData) -> None:
        """Consolidate what the increment learned (EWC estimates its Fisher on ``data``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Anchor, Fisher and counters: tensors and plain values, checkpointed as safetensors + JSON."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoRegularizer:
    """``regularize.method: none``: no penalty."""

    name = "none"

    def __init__(self, config: Any = None, context: Any = None) -> None:
        pass

    def begin_increment(self, model: torch.nn.Module) -> None:
        pass

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        return None

    def end_increment(self, model: torch.nn.Module, data: ConsolidationData) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
