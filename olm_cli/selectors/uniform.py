"""``random``: uniform selection, the baseline every scored selector must beat."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from olm_cli.samples import Block
from olm_cli.selectors.choice import seeded_generator
from olm_cli.selectors.config import SelectorConfig
from olm_cli.selectors.contract import Selection
from olm_cli.selectors.state import check_state_name
from olm_cli.strategy import StrategyContext


class RandomSelector:
    """Keeps a uniformly random ``k`` of the pool without touching the model.

    It honours ``pool_factor`` (so a random baseline sees the same stream position as a
    scored run) but has no scores, hence no weights and no pool statistics.
    """

    name = "random"
    needs_model = False

    def __init__(self, config: SelectorConfig, context: StrategyContext) -> None:
        self.pool_factor = config.pool_factor
        self.generator = seeded_generator(context.seed)

    def select(
        self, model: torch.nn.Module, blocks: Sequence[Block], k: int, pad_id: int
    ) -> Selection:
        k = max(0, min(k, len(blocks)))
        order = torch.randperm(len(blocks), generator=self.generator)[:k]
        indices = [int(i) for i in order]
        return Selection(
            indices=indices, scores=None, weights=None, unselected=len(blocks) - k, stats={}
        )

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_name(self.name, state)
        self.generator.set_state(state["generator"])
