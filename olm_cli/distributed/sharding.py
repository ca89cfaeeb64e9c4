"""FSDP2 for olm's models: shard, gather back when full weights are needed, and keep ranks in step.

``fully_shard`` is applied to every decoder layer and then to the whole model (the embeddings,
the final norm and the LM head, tied or not, form the root's group), the layout the FSDP2
examples use: a forward all-gathers one layer at a time and frees it after use. With
``run.mixed_precision: bf16`` the all-gathered parameters are bf16 and gradients are reduced in
float32 (``MixedPrecisionPolicy``); the sharded parameters and AdamW's moments stay in the
recipe's ``model.dtype``.

A sharded module's forward is a collective: every rank must run the same forwards in the same
order. The loop does (every rank holds the same pool and replay draw), so the selector scores
on the sharded model directly. What runs on one rank only (the evaluation and the release on
rank 0) or keeps a model of its own (LwF's start model) gets an unsharded copy
(:func:`unsharded_copy`): one full model's memory where it is built.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def ensure_process_group(device: torch.device) -> None:
    """A one-process group when none was launched (``run.distributed: fsdp`` without torchrun)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks to shard one by one: transformers' ``_no_split_modules`` classes, else the longest ModuleList."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [list(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return max(lists, key=len) if lists else []


def shard_model(model: torch.nn.Module, *, device: torch.device, mixed_precision: str,
                reshard_after_forward: bool = True) -> torch.nn.Module:
    """``model`` sharded in place across every rank of the default process group (FSDP2)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    model.to(device)
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    # The root's group (embeddings, norm, head) is needed again at the start of backward: keep it gathered.
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    logger.info("FSDP2: %d decoder layer(s) sharded over %d rank(s)", len(layers), dist.get_world_size())
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` went through ``fully_shard`` (cheap: FSDP is not imported to find out)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Skip FSDP2's reduce-scatter for the micro-batches before the last (as DDP's ``no_sync``).

    The unsharded gradients are accumulated meanwhile (one layer's full gradient per layer).
    """
    if enabled or not is_sharded(model):
        yield
        return
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def full_state_dict(model: torch.nn.Module, *, on_every_rank: bool = False) -> dict[str, torch.Tensor]:
    """The unsharded weights (a collective: every rank calls it).

    By default they are gathered to rank 0's host memory and the other ranks get ``{}``;
    ``on_every_rank`` gives every rank a copy on its device.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_every_rank)
    state = get_model_state_dict(model, options=options)
    return {name: value for name, value in state.items() if isinstance(value, torch.Tensor)}


def unsharded_copy(model: torch.nn.Module, *, device: torch.device, on_every_rank: bool = False
                   ) -> torch.nn.Module | None:
    """A plain (unsharded) copy of ``model`` on ``device``; a collective. ``None`` on ranks that get none.

    Costs one full model where it is built: on rank 0 only by default, on every rank with
    ``on_every_rank`` (LwF's start model, which every rank distils from).
    """
    state = full_state_dict(model, on_every_rank=on_every_rank)
    if not state:
        return None
    return plain_model(model, state, device=device)


def plain_model(model: torch.nn.Module, state: dict[str, torch.Tensor], *, device: torch.device) -> torch.nn.Module:
    """A new, unsharded model of ``model``'s architecture holding ``state``."""
    import transformers

    dtype = next(iter(state.values())).dtype
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError("only transformers models can be rebuilt unsharded")
    copy: torch.nn.Module = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    copy.load_state_dict(state)
    copy.to(device)
    copy.train(model.training)
    return copy


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor); a plain tensor as is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def replicated(value: torch.Tensor | float) -> torch.Tensor | float:
    """A DTensor result (the gradient norm of sharded parameters) as the plain tensor every rank agrees on."""
    full = getattr(value, "full_tensor", None)
    return full() if callable(full) else value


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Names of parameters holding NaN/Inf; agreed on by every rank when the model is sharded."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(local(p)).all())]
    if is_sharded(model) and dist.is_initialized() and dist.get_world_size() > 1:
        device = local(next(model.parameters())).device  # NCCL reduces device tensors, gloo CPU ones
        count = torch.tensor([len(bad)], dtype=torch.int64, device=device)
        dist.all_reduce(count)
        if int(count) and not bad:
            bad = ["(a parameter shard on another rank)"]
    return bad
