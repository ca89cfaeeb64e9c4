"""The optimiser's state in a checkpoint, without pickle.

``optimizer.state_dict()`` is a tree of tensors (AdamW's ``exp_avg``, ``exp_avg_sq`` and
``step``) and plain values (each parameter group's hyperparameters and parameter ids). It is
stored as ``optimizer.safetensors`` (the tensors) and ``optimizer.json`` (the structure) through
:mod:`olm_cli.state_files`, so reading a checkpoint never runs a pickle. JSON has neither
integer keys nor tuples, which the state dict uses (parameter ids, ``betas``); they are
recorded so :func:`load_optimizer_state` rebuilds exactly the dictionary that was saved and
``load_state_dict`` restores the optimiser bit for bit.

Checkpoints written before this format hold one ``optimizer.pt`` (``torch.save``); it is read
with ``torch.load(weights_only=True)`` only when the new files are absent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from olm_cli.state_files import load_tree, save_tree

OPTIMIZER_PREFIX = "optimizer"  # optimizer.json + optimizer.safetensors
OPTIMIZER_FILES = (f"{OPTIMIZER_PREFIX}.json", f"{OPTIMIZER_PREFIX}.safetensors")
LEGACY_OPTIMIZER_FILE = "optimizer.pt"
SHARDED_OPTIMIZER_DIR = "optimizer-sharded"  # run.distributed fsdp: one DCP file per rank (olm_cli/distributed)
FORMAT = 1


def save_optimizer_state(directory: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (an ``optimizer.state_dict()``) as ``optimizer.json`` + ``optimizer.safetensors``."""
    tree = {
        "format": FORMAT,
        # A list of pairs: the parameter ids are integer keys, which a JSON object would make strings.
        "state": [{"param": int(param), "values": values} for param, values in state["state"].items()],
        "param_groups": [
            {"values": group, "tuples": sorted(key for key, value in group.items() if isinstance(value, tuple))}
            for group in state["param_groups"]
        ],
    }
    save_tree(Path(directory) / OPTIMIZER_PREFIX, tree)


def load_optimizer_state(directory: Path) -> dict[str, Any]:
    """The optimiser state dict saved in checkpoint ``directory``, in either format.

    A file that cannot be read raises :class:`~olm_cli.errors.CheckpointLoadError` (through
    :func:`~olm_cli.state_files.load_tree`); a structure that is not what
    :func:`save_optimizer_state` writes raises ``KeyError``/``TypeError``/``ValueError``, which the
    caller reports the same way (``loading_checkpoint``).
    """
    directory = Path(directory)
    if is_legacy(directory):
        return torch.load(directory / LEGACY_OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    tree = load_tree(directory / OPTIMIZER_PREFIX)
    if tree.get("format") != FORMAT:
        raise ValueError(f"format {tree.get('format')!r}, this olm reads format {FORMAT}")
    groups = []
    for group in tree["param_groups"]:
        values = dict(group["values"])
        for key in group["tuples"]:
            values[key] = tuple(values[key])
        groups.append(values)
    return {"state": {int(item["param"]): item["values"] for item in tree["state"]}, "param_groups": groups}


def is_legacy(directory: Path) -> bool:
    """Whether checkpoint ``directory`` holds the optimiser as ``optimizer.pt`` (olm 0.2 and earlier)."""
    directory = Path(directory)
    new = any((directory / name).exists() for name in OPTIMIZER_FILES)
    return not new and (directory / LEGACY_OPTIMIZER_FILE).exists()


def optimizer_file_label(directory: Path) -> str:
    """How a load failure names the optimiser's files in ``directory`` (``optimizer.pt`` for an old checkpoint)."""
    if (Path(directory) / SHARDED_OPTIMIZER_DIR).is_dir():
        return f"{SHARDED_OPTIMIZER_DIR}/"
    return LEGACY_OPTIMIZER_FILE if is_legacy(directory) else OPTIMIZER_FILES[0]
