"""The meta-update contract: a :class:`MetaUpdate` acts on the weights after optimiser steps.

A Protocol (composition, not inheritance): any object with these members plugs into the
training step. ``optim.meta.method: none`` builds :class:`NoMetaUpdate`, so the step never asks
whether there is one.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class MetaUpdate(Protocol):
    """An outer loop around the optimiser: it may move the weights after any optimiser step."""

    name: str

    def begin_increment(self, model: torch.nn.Module) -> None:
        """A new increment starts from ``model`` (not called when an increment resumes)."""
        ...

    def after_step(self, model: torch.nn.Module) -> bool:
        """Called after every optimiser step that reached the weights; True when it moved them."""
        ...

    def end_increment(self, model: torch.nn.Module) -> None:
        """The increment's last step was taken (before its final checkpoint and release)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Anchors and counters: tensors and plain values, checkpointed as safetensors + JSON."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoMetaUpdate:
    """``optim.meta.method: none``: the optimiser's steps are final."""

    name = "none"

    def __init__(self, config: Any = None, context: Any = None) -> None:
        pass

    def begin_increment(self, model: torch.nn.Module) -> None:
        pass

    def after_step(self, model: torch.nn.Module) -> bool:
        return False

    def end_increment(self, model: torch.nn.Module) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
