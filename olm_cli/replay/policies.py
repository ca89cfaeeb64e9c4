"""Replay policy short name -> :class:`ReplayPolicy` class, the rule a disk buffer runs.

This is the inner mapping of the replay family: :data:`~olm_cli.replay.registry.REPLAY_BUFFERS`
builds the buffer a recipe names, and a :class:`~olm_cli.replay.buffer.DiskReplayBuffer` looks
its policy up here. A new policy for the disk buffer is registered in both places::

    REPLAY_POLICIES["mine"] = MinePolicy
    REPLAY_BUFFERS.register("mine", DiskReplayBuffer)
"""

from __future__ import annotations

from olm_cli.replay.domain_balanced import DomainBalancedPolicy
from olm_cli.replay.fifo import FifoPolicy
from olm_cli.replay.importance import ImportancePolicy
from olm_cli.replay.lru import LruPolicy
from olm_cli.replay.priority import PriorityPolicy
from olm_cli.replay.protocol import ReplayPolicy
from olm_cli.replay.reservoir import ReservoirPolicy

REPLAY_POLICIES: dict[str, type[ReplayPolicy]] = {
    policy.name: policy
    for policy in (
        ReservoirPolicy,
        FifoPolicy,
        LruPolicy,
        PriorityPolicy,
        DomainBalancedPolicy,
        ImportancePolicy,
    )
}
