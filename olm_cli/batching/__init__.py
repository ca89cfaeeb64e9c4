"""Batch policies: how many samples make the next optimizer step, and in what micro-batches.

One file per policy; :data:`BATCH_POLICIES` maps the recipe's ``batch.policy`` to its class and
builds it: ``BATCH_POLICIES.build(recipe.batch, StrategyContext(clock=..., memory_probe=...))``.
"""

from __future__ import annotations

from olm_cli.batching.config import BatchConfig
from olm_cli.batching.registry import BATCH_POLICIES
from olm_cli.lazy import lazy_getattr

# Everything else is imported on first use, so that reading a recipe (which only needs the
# config classes) does not import torch: `olm train` with nothing to do must return at once.
_LAZY = {
    "AdaptiveBatch": "olm_cli.batching.adaptive",
    "BatchPlan": "olm_cli.batching.contract",
    "BatchPolicy": "olm_cli.batching.contract",
    "FixedBatch": "olm_cli.batching.fixed",
    "MemorySnapshot": "olm_cli.batching.resource",
    "PeriodicBatch": "olm_cli.batching.periodic",
    "ResourceBatch": "olm_cli.batching.resource",
    "StepStats": "olm_cli.batching.contract",
    "UncertaintyBatch": "olm_cli.batching.uncertainty",
    "cuda_memory_probe": "olm_cli.batching.resource",
}


__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = [
    "BATCH_POLICIES",
    "AdaptiveBatch",
    "BatchConfig",
    "BatchPlan",
    "BatchPolicy",
    "FixedBatch",
    "MemorySnapshot",
    "PeriodicBatch",
    "ResourceBatch",
    "StepStats",
    "UncertaintyBatch",
    "cuda_memory_probe",
]
