"""Recipe short name (``replay.policy``) -> replay buffer; the only place that knows them all.

Every buffer is built as ``REPLAY_BUFFERS.build(recipe.replay, context)``: ``none`` builds a
:class:`~olm_cli.replay.no_replay.NoReplay` (so the engine never checks for a missing buffer),
every other name a :class:`~olm_cli.replay.buffer.DiskReplayBuffer` running that policy (see
:mod:`olm_cli.replay.policies`), working in ``context.run_dir / "replay" / f"rank{rank}"``.
Factories are ``"module:Class"`` strings: the recipe validates ``replay.policy`` against this
registry, and this module is imported by the recipe, before the buffer module exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from olm_cli.strategy import Registry

if TYPE_CHECKING:
    from olm_cli.replay.protocol import ReplayBuffer

REPLAY_BUFFERS: Registry[ReplayBuffer] = Registry("replay", "policy")
REPLAY_BUFFERS.register("none", "olm_cli.replay.no_replay:NoReplay")
for _policy in ("reservoir", "fifo", "lru", "priority", "domain_balanced", "importance"):
    REPLAY_BUFFERS.register(_policy, "olm_cli.replay.buffer:DiskReplayBuffer")
del _policy
