"""Batch policies: how many samples make the next optimizer step, and in what micro-batches.

One file per policy; :data:`BATCH_POLICIES` maps the recipe's ``batch.policy`` to its class.
"""

from olm_cli.batching.adaptive import AdaptiveBatch
from olm_cli.batching.config import BatchConfig
from olm_cli.batching.contract import BatchPlan, BatchPolicy, StepStats
from olm_cli.batching.fixed import FixedBatch
from olm_cli.batching.periodic import PeriodicBatch
from olm_cli.batching.registry import BATCH_POLICIES, build_batch_policy
from olm_cli.batching.resource import MemorySnapshot, ResourceBatch, cuda_memory_probe
from olm_cli.batching.uncertainty import UncertaintyBatch

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
    "build_batch_policy",
    "cuda_memory_probe",
]
