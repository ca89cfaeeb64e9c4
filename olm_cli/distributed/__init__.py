"""Several processes training one model: how they share it (DDP or FSDP2) and what each rank does.

``mode`` decides, without torch, which way a launch trains (``run.distributed`` and what the
launcher asked for) and refuses in one line what olm cannot do. ``sharding`` applies FSDP2
(``fully_shard``) and gathers the full weights when something needs them (the checkpoint's
Hugging Face files, the release, the evaluation, LwF's start model). ``sharded_checkpoint``
keeps the optimiser's moments sharded on disk with ``torch.distributed.checkpoint``.
See docs/distributed.md.
"""

from olm_cli.distributed.mode import DistributedMode, resolve_mode

__all__ = ["DistributedMode", "resolve_mode"]
