"""What the engine may rely on from any selector, whatever its scoring rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from olm_cli.samples import Block
from olm_cli.selectors.scoring import PoolScores


@dataclass
class Selection:
    """The outcome of one selection step.

    ``unselected`` is reported (not just implied) so the engine can log how much of the
    stream was skipped; ``pool`` carries the scoring pass's raw measurements so nothing is
    recomputed downstream (e.g. replay priorities).
    """

    indices: list[int]
    scores: np.ndarray | None
    weights: np.ndarray | None
    unselected: int
    stats: dict[str, float] = field(default_factory=dict)
    pool: PoolScores | None = None


@runtime_checkable
class Selector(Protocol):
    """Chooses at most ``k`` of ``blocks`` for the next optimizer step.

    Built by :data:`~olm_cli.selectors.registry.SELECTORS` as ``Cls(config, context)`` from the
    recipe's ``selector`` section and a :class:`~olm_cli.strategy.StrategyContext` (the seed).

    ``needs_model`` is False only for selectors that never run a forward pass, so the engine
    can skip moving the model or drawing a larger pool for nothing. Randomness comes from a
    seeded generator held in ``state_dict`` (tensors and plain Python values only, no pickle)
    so a resumed run selects bit-identically.
    """

    name: str
    pool_factor: int
    needs_model: bool

    def select(
        self, model: torch.nn.Module, blocks: Sequence[Block], k: int, pad_id: int
    ) -> Selection: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
