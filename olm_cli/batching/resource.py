"""``resource``: the largest micro-batch the device's memory allows, found at run time.

Memory per sample depends on the model, sequence length, precision and whatever else shares
the GPU, so it is measured rather than configured: start with the whole effective batch in
one micro-batch, halve on OOM (the engine retries the same samples, so nothing is lost and
accumulation keeps the effective batch), and on CUDA re-size from the measured peak memory
of each step so the micro-batch can grow back once there is room.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPlan, StepStats
from olm_cli.batching.micro import MicroBatchLimit, check_policy_name
from olm_cli.strategy import StrategyContext


@dataclass(frozen=True)
class MemorySnapshot:
    """Bytes at the end of a step: its peak, what stays allocated, and the usable total."""

    peak: int
    allocated: int
    total: int


MemoryProbe = Callable[[], MemorySnapshot | None]


def cuda_memory_probe() -> MemorySnapshot | None:
    """Read (and reset) the CUDA allocator's peak; None without CUDA.

    ``total`` is what this process could hold: memory it has reserved plus what the driver
    reports free (``torch.cuda.mem_get_info``), so other processes on the GPU are respected.
    """
    if not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info()
    snapshot = MemorySnapshot(
        peak=int(torch.cuda.max_memory_allocated()),
        allocated=int(torch.cuda.memory_allocated()),
        total=int(free + torch.cuda.memory_reserved()),
    )
    torch.cuda.reset_peak_memory_stats()
    return snapshot


class ResourceBatch:
    """Fixed effective batch ``size``; micro-batch sized by measured memory."""

    name = "resource"

    def __init__(self, config: BatchConfig, context: StrategyContext) -> None:
        self.cfg = config
        self.size = config.size
        self.limit = MicroBatchLimit(config.size)  # start at the maximum: the whole batch
        # Tests inject a probe through the context; the engine leaves it to the CUDA allocator.
        self.probe: MemoryProbe = context.memory_probe or cuda_memory_probe
        self.steps_since_oom: int | None = None  # None: never hit an OOM

    def plan(self) -> BatchPlan:
        return BatchPlan(self.size, self.limit.fit(self.size))

    def observe(self, stats: StepStats) -> None:
        if self.steps_since_oom is not None:
            self.steps_since_oom += 1
        snapshot = self.probe()
        if snapshot is None:
            return  # CPU: no allocator to ask; OOM back-off alone governs
        used = self.plan().micro_batch
        per_sample = max(snapshot.peak - snapshot.allocated, 1) / used
        budget = snapshot.total * (1.0 - self.cfg.memory_headroom) - snapshot.allocated
        fits = max(1, min(self.size, int(budget // per_sample)))
        may_grow = self.steps_since_oom is None or self.steps_since_oom >= self.cfg.regrow_after
        if fits < used or may_grow:
            self.limit.cap = min(fits, 2 * used)  # grow at most 2x per step: estimates are rough

    def on_oom(self) -> bool:
        self.steps_since_oom = 0
        return self.limit.halve(self.plan().micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.limit.state_dict(),
            "steps_since_oom": self.steps_since_oom,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_policy_name(self.name, state)
        self.limit.load_state_dict(state)
        steps = state["steps_since_oom"]
        self.steps_since_oom = None if steps is None else int(steps)
