"""The optimiser's state in a checkpoint, sharded: every rank writes and reads only its part.

Under ``run.distributed: fsdp`` each rank holds a shard of AdamW's moments; gathering them to
one rank to write would need the whole optimiser's memory there. They are written with
``torch.distributed.checkpoint`` (DCP) into the checkpoint's ``optimizer-sharded/`` directory
(one ``.distcp`` file per rank plus ``.metadata``), keyed by parameter name, not by position.
Files are covered by the checkpoint's manifest like every other file, and the directory becomes
visible only when the whole checkpoint is published.

Reading goes through DCP's resharding: the same checkpoint loads at any world size (each rank
reads the slices its new shard covers), and also into an unsharded model (a single process or
DDP reads everything). The other way round, a checkpoint whose optimiser was saved whole
(``optimizer.json`` + ``optimizer.safetensors``, a single process or DDP) is loaded into a
sharded model by cutting each full tensor into this rank's shard. The weights themselves are
always written gathered, in Hugging Face format, so ``from_pretrained`` reads every checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from olm_cli.rundir.optimizer_state import SHARDED_OPTIMIZER_DIR, load_optimizer_state


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside Accelerate's wrapper."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def has_sharded_optimizer(checkpoint: Path) -> bool:
    return (Path(checkpoint) / SHARDED_OPTIMIZER_DIR).is_dir()


def save_sharded_optimizer(directory: Path, model: torch.nn.Module, optimizer: Any) -> None:
    """Every rank writes its shard of the optimiser state into ``directory/optimizer-sharded`` (a collective).

    ``directory`` must exist on every rank's view of the filesystem (the run directory is shared).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if dist.is_initialized():
        dist.barrier()  # rank 0 has made the (staged) directory
    state = get_optimizer_state_dict(model, _torch_optimizer(optimizer))
    dcp.save({"optimizer": state}, checkpoint_id=Path(directory) / SHARDED_OPTIMIZER_DIR)


def restore_optimizer(checkpoint: Path, model: torch.nn.Module, optimizer: Any, *, sharded: bool) -> bool:
    """Load the optimiser state of ``checkpoint`` through DCP; False when it is for the caller's own reader.

    A sharded checkpoint is read at any world size and into a sharded or unsharded model. A
    whole (unsharded) optimiser state is read here only when the model is sharded; otherwise
    the caller loads it as before.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    inner = _torch_optimizer(optimizer)
    if has_sharded_optimizer(checkpoint):
        # The current (possibly just initialised) state gives DCP the shapes and shards to fill.
        state = get_optimizer_state_dict(model, inner)
        box = {"optimizer": state}
        dcp.load(box, checkpoint_id=Path(checkpoint) / SHARDED_OPTIMIZER_DIR)
        set_optimizer_state_dict(model, inner, box["optimizer"])
        return True
    if not sharded:
        return False
    full = by_parameter_name(load_optimizer_state(checkpoint), model, inner)
    set_optimizer_state_dict(model, inner, full, options=StateDictOptions(full_state_dict=True))
    return True


def by_parameter_name(state: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer
                      ) -> dict[str, Any]:
    """A whole optimiser state keyed by position (``optimizer.state_dict()``) re-keyed by parameter name.

    Positions count the parameters group by group, in the order the optimiser holds them;
    ``build_optimizer`` builds the same groups in the same order for a sharded model (sharding
    keeps every parameter's name), so position ``i`` names the same parameter in both.
    """
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = [len(group["params"]) for group in state["param_groups"]]
    if sum(saved) != len(order):
        raise ValueError(f"the checkpoint's optimiser holds {sum(saved)} parameters, this model trains {len(order)}")
    groups, start = [], 0
    for group in state["param_groups"]:
        count = len(group["params"])
        groups.append({**group, "params": order[start : start + count]})
        start += count
    return {"state": {order[int(i)]: values for i, values in state["state"].items()}, "param_groups": groups}
