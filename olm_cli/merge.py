"""``olm merge``: weighted parameter averaging of HF checkpoints (model soups, federated averaging).

Only safetensors are read -- a checkpoint is data, and unpickling ``.bin`` files would execute
code. Tensors are averaged one name at a time in float32 and written in the first checkpoint's
dtype, so peak memory is one output model plus one accumulator tensor. An olm checkpoint (one
with a ``MANIFEST.json``) is re-hashed first, so bytes flipped on disk are never averaged into
the result; a file that cannot be read is one error line naming the checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from olm_cli.errors import CheckpointError
from olm_cli.rundir.atomic import publishing_directory
from olm_cli.rundir.checkpoint import MANIFEST_FILENAME, loading_checkpoint, verify_checkpoint

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Everything from_pretrained and AutoTokenizer need besides the weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights summing to 1; None means a uniform average. Sample counts work as weights."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise CheckpointError(f"got {len(weights)} weights for {count} checkpoints")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise CheckpointError(f"merge weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise CheckpointError("merge weights sum to zero")
    return [w / total for w in values]


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (single file or sharded)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} is not a directory")
    single = checkpoint / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = checkpoint / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as exc:  # AttributeError: not a JSON object
            raise CheckpointError(f"checkpoint {checkpoint}: {INDEX_NAME} is unreadable ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (checkpoint / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {checkpoint} is missing shard(s) {missing}")
        return [checkpoint / f for f in files]
    if any(checkpoint.glob("*.bin")):
        raise CheckpointError(
            f"checkpoint {checkpoint} has only pickle (.bin) weights; olm reads safetensors only "
            "(re-save it with save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"checkpoint {checkpoint} has no {WEIGHTS_NAME} or {INDEX_NAME}")


class CheckpointReader:
    """Lazy, mmap-backed access to every tensor of one checkpoint by name (re-hashed first if it is olm's)."""

    def __init__(self, checkpoint: Path, stack: ExitStack, *, verify: bool = True) -> None:
        self.checkpoint = checkpoint
        self.where: dict[str, Any] = {}
        self.metadata: dict[str, str] = {}
        if verify and (checkpoint / MANIFEST_FILENAME).is_file():
            verify_checkpoint(checkpoint, deep=True)
        for path in weight_files(checkpoint):
            with loading_checkpoint(checkpoint, path.name):
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                self.metadata.update(handle.metadata() or {})
                for key in handle.keys():
                    self.where[key] = handle

    def get(self, key: str) -> torch.Tensor:
        with loading_checkpoint(self.checkpoint, f"tensor {key!r}"):
            tensor: torch.Tensor = self.where[key].get_tensor(key)
        return tensor


def merge_checkpoints(
    checkpoints: Sequence[Path], weights: Sequence[float] | None, out: Path
) -> Path:
    """Write sum_i w_i * theta_i (w normalised) to ``out`` as an HF checkpoint and return ``out``.

    Config and tokenizer files are copied from the first checkpoint. Every checkpoint must
    have exactly the same tensor names and shapes; the first difference is reported naming
    the checkpoint and the tensor. Non-floating tensors (integer buffers) are copied from the
    first checkpoint and must be equal everywhere. ``out`` must not exist or be empty; the
    result is written to a temporary sibling and renamed into place (fsynced, with the umask's
    modes), so a failed merge leaves nothing behind.
    """
    if not checkpoints:
        raise CheckpointError("merge needs at least one checkpoint")
    paths = [Path(c) for c in checkpoints]
    ws = normalise_weights(weights, len(paths))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} already exists and is not empty")

    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers = [CheckpointReader(p, stack) for p in paths]
        first = readers[0]
        names = sorted(first.where)
        for reader in readers[1:]:
            extra = sorted(set(reader.where) - set(first.where))
            missing = sorted(set(first.where) - set(reader.where))
            if missing:
                raise CheckpointError(
                    f"checkpoint {reader.checkpoint} lacks tensor {missing[0]!r} "
                    f"present in {first.checkpoint}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            if extra:
                raise CheckpointError(
                    f"checkpoint {reader.checkpoint} has tensor {extra[0]!r} "
                    f"absent from {first.checkpoint}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                )
        for name in names:
            base = first.get(name)
            if not base.is_floating_point():
                for reader in readers[1:]:
                    other = reader.get(name)
                    if other.shape != base.shape or not torch.equal(other, base):
                        raise CheckpointError(
                            f"non-float tensor {name!r} differs between {first.checkpoint} "
                            f"and {reader.checkpoint}; it cannot be averaged"
                        )
                merged[name] = base.clone()
                continue
            acc = base.to(torch.float32) * ws[0]
            for reader, w in zip(readers[1:], ws[1:], strict=True):
                tensor = reader.get(name)
                if tensor.shape != base.shape:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)} in {reader.checkpoint} "
                        f"but {tuple(base.shape)} in {first.checkpoint}"
                    )
                acc.add_(tensor.to(torch.float32), alpha=w)
            merged[name] = acc.to(base.dtype)
        metadata = dict(first.metadata)
    metadata.setdefault("format", "pt")

    with publishing_directory(out) as staged:
        save_file(merged, str(staged / WEIGHTS_NAME), metadata=metadata)
        for side in SIDE_FILES:
            src = paths[0] / side
            if src.is_file():
                shutil.copy2(src, staged / side)
        (staged / "merge.json").write_text(
            json.dumps({"checkpoints": [str(p) for p in paths], "weights": ws}, indent=2), encoding="utf-8"
        )
    return out


def average_weights(checkpoints: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The uniform average of ``checkpoints``' weights, in memory (``release.merge: sma``).

    Same rules as :func:`merge_checkpoints` (safetensors only, olm checkpoints re-hashed,
    float32 accumulation, each tensor back in its own dtype, integer buffers taken from the
    first), without writing anything: the caller loads the result into a model.
    """
    if not checkpoints:
        raise CheckpointError("averaging needs at least one checkpoint")
    paths = [Path(c) for c in checkpoints]
    averaged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers = [_Reader(p, stack) for p in paths]
        names = sorted(readers[0].where)
        for reader in readers[1:]:
            if sorted(reader.where) != names:
                raise CheckpointError(f"checkpoints {paths[0].name} and {reader.checkpoint.name} hold different "
                                      "tensors; they cannot be averaged")
        for name in names:
            base = readers[0].get(name)
            if not base.is_floating_point():
                averaged[name] = base.clone()
                continue
            acc = base.to(torch.float32)
            for reader in readers[1:]:
                acc.add_(reader.get(name).to(torch.float32))
            averaged[name] = acc.div_(len(readers)).to(base.dtype)
    return averaged
