"""Replay: keep a bounded, checkpointed sample of past data and mix it into training batches.

The engine's whole interface::

    buffer = build_replay_buffer(recipe.replay, run_dir / "replay", seed)   # None if disabled
    buffer.load(checkpoint / "replay")           # on resume
    seed_buffer(buffer, blocks, recipe.replay.seed_samples)  # optional warm start
    items = buffer.sample(round(ratio * batch_size))         # each step
    buffer.add(new_blocks, step, scores=losses)              # each step
    buffer.update_scores([i.id for i in items], replay_losses)
    buffer.save(checkpoint_tmp / "replay")        # with each checkpoint

Importing this package does not import torch, so ``olm replay-inspect`` starts quickly.
"""

from olm_cli.replay.buffer import DiskReplayBuffer, build_replay_buffer
from olm_cli.replay.config import ReplayConfig
from olm_cli.replay.protocol import ReplayBuffer, ReplayItem, ReplayPolicy
from olm_cli.replay.registry import REPLAY_POLICIES
from olm_cli.replay.seeding import expand_seed_paths, seed_buffer

__all__ = [
    "REPLAY_POLICIES",
    "DiskReplayBuffer",
    "ReplayBuffer",
    "ReplayConfig",
    "ReplayItem",
    "ReplayPolicy",
    "build_replay_buffer",
    "expand_seed_paths",
    "seed_buffer",
]
