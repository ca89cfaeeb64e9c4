"""Per-parameter state of the strategy parts (anchors, Fisher) under FSDP2: sharded like the weights.

EWC's and L2's anchor and Fisher and Reptile's window start are tensors keyed by parameter
name. Under ``run.distributed: fsdp`` every rank keeps only the slice of each that matches its
shard of the parameter (``param.to_local()``'s rows), so they cost what the rank's parameter
shard costs, not a full model. Element-wise work on them (the penalty's terms, Reptile's
interpolation) is the same arithmetic on each slice as on the whole, so it is exact.

The checkpoint holds them whole, like the weights, so a run resumes at any world size and in
any mode: :func:`gather_parameter_state` assembles the full tensors before rank 0 writes
(a collective: every rank calls it, in the same order), and :func:`local_parameter_state`
cuts a loaded full tensor back to this rank's rows (no communication).
"""

from __future__ import annotations

from typing import Any

import torch


def _sharded_parameters(model: torch.nn.Module) -> dict[str, Any]:
    """Name -> parameter, for the parameters FSDP2 sharded (DTensors)."""
    from torch.distributed.tensor import DTensor

    return {name: p for name, p in model.named_parameters() if isinstance(p, DTensor)}


def _map_tensors(tree: Any, params: dict[str, Any], convert: Any, key: str | None = None) -> Any:
    """``tree`` with ``convert(tensor, param)`` applied to every tensor stored under a sharded parameter's name."""
    if isinstance(tree, dict):
        return {k: _map_tensors(v, params, convert, k) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor) and key in params:
        return convert(tree, params[key])
    return tree


def gather_parameter_state(tree: Any, model: torch.nn.Module, *, on_every_rank: bool = False) -> Any:
    """``tree`` with every parameter-keyed slice made whole again, in host memory (a collective).

    One tensor at a time is gathered on the devices; rank 0 keeps the whole ones (for the
    checkpoint it writes), the other ranks their own slices, unless ``on_every_rank``.
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    keep = on_every_rank or dist.get_rank() == 0

    def whole(tensor: torch.Tensor, param: Any) -> torch.Tensor:
        if tuple(tensor.shape) == tuple(param.shape) and tuple(param.to_local().shape) != tuple(param.shape):
            return tensor  # already whole (a state loaded and not yet cut)
        dtensor = DTensor.from_local(tensor.to(param.to_local().device), param.device_mesh, param.placements,
                                     run_check=False, shape=param.shape, stride=param.stride())
        full = dtensor.full_tensor()
        return full.cpu() if keep else tensor

    return _map_tensors(tree, _sharded_parameters(model), whole)


def local_parameter_state(tree: Any, model: torch.nn.Module) -> Any:
    """``tree`` (as loaded from a checkpoint: whole tensors) with each parameter-keyed tensor cut to this rank's rows."""
    def cut(tensor: torch.Tensor, param: Any) -> torch.Tensor:
        mine = tuple(param.to_local().shape)
        rank = param.device_mesh.get_local_rank()
        if tuple(tensor.shape) != tuple(param.shape):
            if tuple(tensor.shape) == mine:
                return tensor  # a slice already
            raise ValueError(f"a saved tensor has shape {tuple(tensor.shape)}, the parameter {tuple(param.shape)}")
        # FSDP2 shards dimension 0 as torch.chunk does; ranks past the last chunk hold no rows.
        world = param.device_mesh.size()
        chunks = torch.chunk(tensor, world, dim=0)
        piece = chunks[rank] if rank < len(chunks) else tensor[0:0]
        if tuple(piece.shape) != mine:
            raise ValueError(f"cannot cut a saved tensor of shape {tuple(tensor.shape)} to this rank's shard {mine}")
        return piece.clone()

    return _map_tensors(tree, _sharded_parameters(model), cut)
