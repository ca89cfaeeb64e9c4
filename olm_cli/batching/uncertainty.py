"""``uncertainty``: a bigger batch when the incoming pool is uncertain.

When the model is unsure about what arrives (high mean predictive entropy, e.g. a new domain)
per-sample gradients disagree more, so averaging over more samples buys a steadier update;
familiar text (low entropy) is learnt fine from small, frequent steps. The entropy comes from
the selector's scoring pass (``StepStats.pool_mean_entropy``), so it costs nothing extra.
"""

from __future__ import annotations

from typing import Any

from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPlan, StepStats
from olm_cli.batching.micro import MicroBatchLimit, check_policy_name, clamp
from olm_cli.strategy import StrategyContext


class UncertaintyBatch:
    """Linear map from the last pool mean entropy to [min_size, max_size]; ``size`` until then."""

    name = "uncertainty"

    def __init__(self, config: BatchConfig, context: StrategyContext) -> None:
        self.cfg = config
        self.limit = MicroBatchLimit(config.micro_batch)
        self.entropy: float | None = None

    def size_for(self, entropy: float) -> int:
        """Monotone non-decreasing in ``entropy``, saturating at the recipe's bounds."""
        cfg = self.cfg
        frac = (entropy - cfg.entropy_low) / (cfg.entropy_high - cfg.entropy_low)
        frac = min(1.0, max(0.0, frac))
        return clamp(
            cfg.min_size + frac * (cfg.max_size - cfg.min_size), cfg.min_size, cfg.max_size
        )

    def plan(self) -> BatchPlan:
        samples = self.cfg.size if self.entropy is None else self.size_for(self.entropy)
        return BatchPlan(samples, self.limit.fit(samples))

    def observe(self, stats: StepStats) -> None:
        if stats.pool_mean_entropy is not None:
            self.entropy = float(stats.pool_mean_entropy)

    def on_oom(self) -> bool:
        return self.limit.halve(self.plan().micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, **self.limit.state_dict(), "entropy": self.entropy}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_policy_name(self.name, state)
        self.limit.load_state_dict(state)
        entropy = state["entropy"]
        self.entropy = None if entropy is None else float(entropy)
