"""``fixed``: the same effective batch every step -- the reproducible default."""

from __future__ import annotations

from typing import Any

from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPlan, StepStats
from olm_cli.batching.micro import MicroBatchLimit, check_policy_name
from olm_cli.strategy import StrategyContext


class FixedBatch:
    """``size`` samples per step in micro-batches of at most ``micro_batch``."""

    name = "fixed"

    def __init__(self, config: BatchConfig, context: StrategyContext) -> None:
        self.size = config.size
        self.limit = MicroBatchLimit(config.micro_batch)

    def plan(self) -> BatchPlan:
        return BatchPlan(self.size, self.limit.fit(self.size))

    def observe(self, stats: StepStats) -> None:
        """Nothing to learn: the size is fixed by the recipe."""

    def on_oom(self) -> bool:
        return self.limit.halve(self.plan().micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.limit.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_policy_name(self.name, state)
        self.limit.load_state_dict(state)
