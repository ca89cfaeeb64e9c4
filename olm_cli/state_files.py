"""Save nested training state without pickle: tensors/arrays to safetensors, the rest to JSON.

Strategy parts expose ``state_dict()`` trees that mix numbers, strings, lists, numpy arrays and
torch tensors (RNG states, cluster centroids). ``save_tree(prefix, tree)`` writes
``prefix.json`` (the structure, with placeholders) and ``prefix.safetensors`` (the arrays), and
``load_tree(prefix)`` rebuilds the exact tree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from olm_cli.errors import CheckpointLoadError

_TENSOR = "__tensor__"
_NDARRAY = "__ndarray__"


def _flatten(node: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(node, torch.Tensor):
        tensors[path] = node.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(node, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(node))
        return {_NDARRAY: path}
    if isinstance(node, dict):
        return {str(k): _flatten(v, tensors, f"{path}.{k}") for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_flatten(v, tensors, f"{path}.{i}") for i, v in enumerate(node)]
    if isinstance(node, np.generic):
        return node.item()
    return node


def _unflatten(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, dict):
        if set(node) == {_TENSOR}:
            return tensors[node[_TENSOR]]
        if set(node) == {_NDARRAY}:
            return tensors[node[_NDARRAY]].numpy()
        return {k: _unflatten(v, tensors) for k, v in node.items()}
    if isinstance(node, list):
        return [_unflatten(v, tensors) for v in node]
    return node


def save_tree(prefix: Path, tree: dict[str, Any]) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten(tree, tensors, "root")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(structure), encoding="utf-8")
    if tensors:
        save_file(tensors, str(prefix.with_suffix(".safetensors")))


def load_tree(prefix: Path) -> dict[str, Any]:
    """The tree ``save_tree(prefix, ...)`` wrote; unreadable files raise CheckpointLoadError.

    The error names the directory holding the files (a checkpoint), so the caller can fall
    back to an older checkpoint instead of failing every night on the same file.
    """
    structure_path = prefix.with_suffix(".json")
    tensor_path = prefix.with_suffix(".safetensors")
    try:
        structure = json.loads(structure_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointLoadError(prefix.parent, f"{structure_path.name} is unreadable ({exc})") from None
    try:
        tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
    except (OSError, SafetensorError) as exc:
        raise CheckpointLoadError(prefix.parent, f"{tensor_path.name} is unreadable ({exc})") from None
    try:
        return _unflatten(structure, tensors)
    except KeyError as exc:
        raise CheckpointLoadError(prefix.parent, f"{structure_path.name} names tensor {exc} that {tensor_path.name} lacks") from None
