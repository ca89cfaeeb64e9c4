"""Recipe short name -> batch policy class; the only place that knows every policy."""

from __future__ import annotations

import time
from collections.abc import Callable

from olm_cli.batching.adaptive import AdaptiveBatch
from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPolicy
from olm_cli.batching.fixed import FixedBatch
from olm_cli.batching.periodic import PeriodicBatch
from olm_cli.batching.resource import MemoryProbe, ResourceBatch
from olm_cli.batching.uncertainty import UncertaintyBatch

BATCH_POLICIES: dict[str, Callable[[BatchConfig, Callable[[], float]], BatchPolicy]] = {
    "fixed": FixedBatch,
    "adaptive": AdaptiveBatch,
    "uncertainty": UncertaintyBatch,
    "resource": ResourceBatch,
    "periodic": PeriodicBatch,
}


def build_batch_policy(
    cfg: BatchConfig,
    clock: Callable[[], float] = time.monotonic,
    memory_probe: MemoryProbe | None = None,
) -> BatchPolicy:
    """Instantiate the recipe's policy; ``clock``/``memory_probe`` are injectable for tests."""
    if cfg.policy == "resource" and memory_probe is not None:
        return ResourceBatch(cfg, clock, memory_probe)
    return BATCH_POLICIES[cfg.policy](cfg, clock)
