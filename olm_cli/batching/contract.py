"""What the engine may rely on from any batch policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class BatchPlan:
    """One optimizer step: ``samples`` in total, ``micro_batch`` per forward/backward."""

    samples: int
    micro_batch: int

    @property
    def accumulation(self) -> int:
        """Forward/backward passes per optimizer step."""
        return math.ceil(self.samples / self.micro_batch)


@dataclass
class StepStats:
    """What happened in the step the engine just took (``grad_norm`` before clipping)."""

    loss: float
    grad_norm: float
    samples: int
    tokens: int
    seconds: float
    pool_mean_entropy: float | None = None


@runtime_checkable
class BatchPolicy(Protocol):
    """Decides the size of each optimizer step and survives out-of-memory errors.

    Built by :data:`~olm_cli.batching.registry.BATCH_POLICIES` as ``Cls(config, context)`` from
    the recipe's ``batch`` section and a :class:`~olm_cli.strategy.StrategyContext` (clock,
    memory probe).

    ``plan()`` has no side effects (the engine may call it more than once, e.g. to log);
    ``observe()`` feeds back the step that was taken; ``on_oom()`` halves the micro-batch of
    the current plan, keeping its samples, and returns False once it is already 1.
    """

    name: str

    def plan(self) -> BatchPlan: ...

    def observe(self, stats: StepStats) -> None: ...

    def on_oom(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
