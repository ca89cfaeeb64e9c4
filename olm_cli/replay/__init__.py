"""Replay: keep a bounded, checkpointed sample of past data and mix it into training batches.

The engine's whole interface::

    buffer = REPLAY_BUFFERS.build(recipe.replay, context)  # NoReplay (a no-op) for policy none
    buffer.load(checkpoint / "replay")           # on resume
    seed_buffer(buffer, blocks, recipe.replay.seed_samples)  # optional warm start
    items = buffer.sample(round(ratio * batch_size))         # each step
    buffer.add(new_blocks, step, scores=losses)              # each step
    buffer.update_scores([i.id for i in items], replay_losses)
    buffer.save(checkpoint_tmp / "replay")        # with each checkpoint

Importing this package does not import torch, so ``olm replay-inspect`` starts quickly.
"""

from olm_cli.replay.buffer import DiskReplayBuffer
from olm_cli.replay.config import ReplayConfig
from olm_cli.replay.no_replay import NoReplay
from olm_cli.replay.policies import REPLAY_POLICIES
from olm_cli.replay.protocol import ReplayBuffer, ReplayItem, ReplayPolicy
from olm_cli.replay.registry import REPLAY_BUFFERS
from olm_cli.replay.seeding import expand_seed_paths, seed_buffer

__all__ = [
    "REPLAY_BUFFERS",
    "REPLAY_POLICIES",
    "DiskReplayBuffer",
    "NoReplay",
    "ReplayBuffer",
    "ReplayConfig",
    "ReplayItem",
    "ReplayPolicy",
    "expand_seed_paths",
    "seed_buffer",
]
