"""Anchored weights theta*, shared by the regularisers, and reading 0.1 checkpoints' state."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from olm_cli.errors import CheckpointLoadError


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that the optimiser moves; frozen ones cannot drift, so they need no anchor."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable weights, on each parameter's own device and dtype.

    Of a sharded model (FSDP2) the rank's own rows only (``to_local()``): the copy is sharded
    like the weights (olm_cli/distributed/sharded_state.py).
    """
    return {name: local(p).detach().clone() for name, p in trainable_parameters(model).items()}


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded parameter (differentiable), a plain tensor as it is."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def legacy_state(directory: Path) -> dict[str, Any]:
    """The state a checkpoint of olm 0.1 kept in ``regularizer/`` (before state_dict), for a resume.

    0.1 wrote ``ewc_fisher``/``ewc_anchor`` or ``l2_anchor`` safetensors next to a JSON file;
    newer checkpoints keep the same tensors in the strategy-state tree.
    """
    directory = Path(directory)
    state: dict[str, Any] = {}
    try:
        if (directory / "ewc.json").is_file():
            meta = json.loads((directory / "ewc.json").read_text(encoding="utf-8"))
            state = {"method": "ewc", "estimates": int(meta.get("estimates", 0)),
                     "fisher": load_file(str(directory / "ewc_fisher.safetensors")),
                     "anchor": load_file(str(directory / "ewc_anchor.safetensors"))}
        elif (directory / "l2_anchor.safetensors").is_file():
            state = {"method": "l2", "anchor": load_file(str(directory / "l2_anchor.safetensors"))}
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointLoadError(directory.parent, f"cannot load the regulariser state ({exc})") from None
    return state


def on_device(store: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """Return ``store[name]`` on ``like``'s device, moving it there once (after a CPU load)."""
    tensor = store[name]
    if tensor.device != like.device:
        tensor = tensor.to(like.device)
        store[name] = tensor
    return tensor
