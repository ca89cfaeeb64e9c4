"""``periodic``: one optimizer step per time period or per amount of arrived data.

For a live stream the natural unit is time ("update every 30 s") or volume ("every 256
samples"), not a fixed batch. From measured throughput -- samples per second between
consecutive steps, which includes waiting for data to arrive -- the policy sizes the next
batch so that one update takes about ``period_seconds``. The clock is injected so tests (and
simulations) can drive time by hand.
"""

from __future__ import annotations

from typing import Any

from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPlan, StepStats
from olm_cli.batching.micro import MicroBatchLimit, check_policy_name, clamp
from olm_cli.strategy import StrategyContext


class PeriodicBatch:
    """Samples per step = throughput x period_seconds, capped by period_samples."""

    name = "periodic"

    def __init__(self, config: BatchConfig, context: StrategyContext) -> None:
        self.cfg = config
        self.clock = context.clock
        self.limit = MicroBatchLimit(config.micro_batch)
        self.throughput: float | None = None  # samples per second, moving average
        self.last_time: float | None = None

    def plan(self) -> BatchPlan:
        cfg = self.cfg
        if cfg.period_seconds is None or self.throughput is None:
            wanted = float(cfg.period_samples if cfg.period_samples is not None else cfg.size)
        else:
            wanted = self.throughput * cfg.period_seconds
            if cfg.period_samples is not None:
                wanted = min(wanted, cfg.period_samples)
        samples = clamp(wanted, cfg.min_size, cfg.max_size)
        return BatchPlan(samples, self.limit.fit(samples))

    def observe(self, stats: StepStats) -> None:
        now = self.clock()
        elapsed = stats.seconds if self.last_time is None else now - self.last_time
        self.last_time = now
        if elapsed <= 0.0 or stats.samples <= 0:
            return
        rate = stats.samples / elapsed
        alpha = self.cfg.throughput_smoothing
        self.throughput = (
            rate if self.throughput is None else alpha * rate + (1 - alpha) * self.throughput
        )

    def on_oom(self) -> bool:
        return self.limit.halve(self.plan().micro_batch)

    def state_dict(self) -> dict[str, Any]:
        # The clock reading is process-local (monotonic), so only the throughput is kept.
        return {"name": self.name, **self.limit.state_dict(), "throughput": self.throughput}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_policy_name(self.name, state)
        self.limit.load_state_dict(state)
        throughput = state["throughput"]
        self.throughput = None if throughput is None else float(throughput)
        self.last_time = None
