"""Which way a launch trains: one process, DDP or FSDP2 (torch-free, decided before anything is built).

Two things decide: the recipe's ``run.distributed`` and what the launcher asked for.
``accelerate launch --use_fsdp`` announces itself through environment variables
(``ACCELERATE_USE_FSDP``, ``FSDP_VERSION``, ``FSDP_*``); torchrun only through ``WORLD_SIZE``.
olm shards with FSDP2 (``fully_shard``) itself, on CPU (gloo) and GPU alike, so a launch asking
for something else (FSDP version 1, CPU offload) is refused with one line instead of being run
another way: nothing falls back silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from olm_cli.errors import RecipeError

ModeName = Literal["single", "ddp", "fsdp", "deepspeed"]
_TRUE = ("1", "true", "yes")


@dataclass(frozen=True)
class DistributedMode:
    """The resolved way to train. ``deepspeed`` is left to Accelerate, as launched."""

    name: ModeName
    world_size: int
    reshard_after_forward: bool = True

    @property
    def sharded(self) -> bool:
        """Parameters, gradients and optimiser state are split across ranks (olm's FSDP2 path)."""
        return self.name == "fsdp"


def _flag(environ: Mapping[str, str], key: str) -> bool:
    return environ.get(key, "false").strip().lower() in _TRUE


def resolve_mode(requested: str, environ: Mapping[str, str] | None = None) -> DistributedMode:
    """``run.distributed`` (``auto``/``ddp``/``fsdp``) against the launch; a RecipeError (exit 2) when they disagree."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        raise RecipeError(f"WORLD_SIZE={env.get('WORLD_SIZE')!r} is not a number of processes") from None
    launcher_fsdp = _flag(env, "ACCELERATE_USE_FSDP")
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        if requested == "fsdp" or launcher_fsdp:
            raise RecipeError("run.distributed: the launch asks for DeepSpeed, which does not combine with FSDP; "
                              "launch without --use_deepspeed, or set run.distributed: auto")
        return DistributedMode("deepspeed", world)
    if launcher_fsdp:
        version = env.get("FSDP_VERSION", "1").strip()
        if requested == "ddp":
            raise RecipeError("run.distributed is 'ddp' but the launch asks for FSDP (accelerate launch --use_fsdp); "
                              "set run.distributed: fsdp, or launch without --use_fsdp")
        if version != "2":
            raise RecipeError(f"accelerate launch --use_fsdp --fsdp_version {version}: olm shards with FSDP2 only; "
                              "launch with --fsdp_version 2, or with torchrun and run.distributed: fsdp")
        for key, what in (("FSDP_OFFLOAD_PARAMS", "--fsdp_offload_params"),
                          ("FSDP_ACTIVATION_CHECKPOINTING", "--fsdp_activation_checkpointing")):
            if _flag(env, key):
                raise RecipeError(f"accelerate launch {what} true: olm's FSDP2 path does not do that; launch without it")
        reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("false", "0", "no")
        return DistributedMode("fsdp", world, reshard_after_forward=reshard)
    if requested == "fsdp":
        return DistributedMode("fsdp", world)
    return DistributedMode("ddp" if world > 1 else "single", world)
