"""Shared mechanics of the selectors that rank a pool by one per-candidate score.

``entropy``, ``loss`` and ``gradnorm`` differ only in which field of
:class:`~olm_cli.selectors.scoring.PoolScores` they rank by; each is a one-line subclass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from olm_cli.samples import Block
from olm_cli.selectors.choice import ScoreChooser
from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.contract import Selection
from olm_cli.selectors.scoring import score_pool
from olm_cli.selectors.state import check_state_name
from olm_cli.strategy import StrategyContext


class PoolScoreSelector:
    """Scores the pool in one no-grad forward, then chooses by ``score_field`` under the mode."""

    name: ClassVar[str]
    score_field: ClassVar[str]
    needs_model = True

    def __init__(self, config: SelectorConfig, context: StrategyContext) -> None:
        self.pool_factor = config.pool_factor
        self.score_micro_batch = config.score_micro_batch
        self.score_tokens = config.score_tokens
        self.chooser = ScoreChooser(config, context.seed)

    def select(
        self, model: torch.nn.Module, blocks: Sequence[Block], k: int, pad_id: int
    ) -> Selection:
        pool = score_pool(model, blocks, pad_id, self.score_micro_batch, self.score_tokens)
        return self.chooser.selection(getattr(pool, self.score_field), k, pool)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.chooser.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_name(self.name, state)
        self.chooser.load_state_dict(state)
