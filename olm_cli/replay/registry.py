"""Recipe short name (``replay.policy``) -> policy class."""

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
