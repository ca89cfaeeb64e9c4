"""``replay.policy: none``: a buffer that keeps nothing.

The engine always holds a replay buffer, so its loop has no "is replay on?" branches: with
replay off it holds this one, which is empty forever and writes nothing to checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from olm_cli.replay.protocol import ReplayItem

if TYPE_CHECKING:
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.samples import Block
    from olm_cli.strategy import StrategyContext


class NoReplay:
    """The replay buffer of ``policy: none``: every call is accepted and does nothing."""

    policy_name = "none"

    def __init__(self, config: ReplayConfig, context: StrategyContext) -> None:
        """Takes the family's ``(config, context)`` like every buffer, and needs neither."""

    def __len__(self) -> int:
        return 0

    @property
    def num_tokens(self) -> int:
        return 0

    def add(
        self,
        blocks: Sequence[Block],
        step: int,
        scores: Sequence[float] | None = None,
        logits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """New blocks are not kept."""

    def sample(self, k: int) -> list[ReplayItem]:
        return []

    def update_scores(self, ids: Sequence[int], scores: Sequence[float]) -> None:
        """There is nothing to re-score."""

    def save(self, directory: Path) -> None:
        """No snapshot: a checkpoint of a run without replay has no ``replay/`` directory."""

    def load(self, directory: Path) -> None:
        """A snapshot left by an earlier policy is not read (as before: replay is off now)."""

    def close(self) -> None:
        """No files are open."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""
