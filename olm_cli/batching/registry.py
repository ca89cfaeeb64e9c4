"""Recipe short name (``batch.policy``) -> batch policy; the only place that knows every policy.

Factories are ``"module:Class"`` strings, resolved on first build, so that the recipe (which
validates ``batch.policy`` against this registry) can be read without importing torch. Every
policy is built as ``BATCH_POLICIES.build(recipe.batch, context)``; policies that need time or
memory readings take them from ``context.clock`` and ``context.memory_probe``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olm_cli.strategy import Registry

if TYPE_CHECKING:
    from olm_cli.batching.contract import BatchPolicy

BATCH_POLICIES: Registry[BatchPolicy] = Registry("batch", "policy")
BATCH_POLICIES.register("fixed", "olm_cli.batching.fixed:FixedBatch")
BATCH_POLICIES.register("adaptive", "olm_cli.batching.adaptive:AdaptiveBatch")
BATCH_POLICIES.register("uncertainty", "olm_cli.batching.uncertainty:UncertaintyBatch")
BATCH_POLICIES.register("resource", "olm_cli.batching.resource:ResourceBatch")
BATCH_POLICIES.register("periodic", "olm_cli.batching.periodic:PeriodicBatch")
