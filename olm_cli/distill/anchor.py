"""Anchored weights theta* and their safetensors persistence, shared by the regularisers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from olm_cli.errors import CheckpointError


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameters that the optimiser moves; frozen ones cannot drift, so they need no anchor."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable weights, on each parameter's own device and dtype."""
    return {name: p.detach().clone() for name, p in trainable_parameters(model).items()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Atomically write tensors as safetensors (tmp + os.replace), never pickle."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"regulariser state {path} is missing")
    return load_file(str(path))


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"regulariser state {path} is missing")
    with open(path, encoding="utf-8") as fh:
        data: dict = json.load(fh)
    return data


def on_device(store: dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """Return ``store[name]`` on ``like``'s device, moving it there once (after a CPU load)."""
    tensor = store[name]
    if tensor.device != like.device:
        tensor = tensor.to(like.device)
        store[name] = tensor
    return tensor
