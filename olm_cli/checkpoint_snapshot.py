"""What a checkpoint holds, captured at a step boundary so it can be written while training goes on.

A checkpoint must describe one instant: the weights, the optimiser's moments, the generators,
every strategy part and the trainer state as they were after the same optimizer step, or a
resume would not be bit-identical. Training mutates all of them in place, so a checkpoint
written in the background (``run.async_checkpoint``) first copies them to host memory
(:func:`host_copy`; on the CPU a clone, on an accelerator a device-to-host copy) and writes
that copy. The synchronous path captures the same snapshot without the copy (training waits).

The replay buffer is not in the snapshot: its snapshot is cheap (segments are hard-linked) and
is written into the staged checkpoint directory by the training thread (``CheckpointManager.stage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from olm_cli.modeling import save_tokenizer
from olm_cli.run_state import TRAINER_STATE
from olm_cli.rundir.optimizer_state import save_optimizer_state
from olm_cli.state_files import save_tree


@dataclass
class TrainingSnapshot:
    """Everything a checkpoint directory holds but the replay buffer, ready to write from any thread."""

    model: Any  # a transformers model: save_pretrained reads its config and tied-weight names, never its tensors
    weights: dict[str, torch.Tensor]
    tokenizer: Any  # not used by training meanwhile (a private copy when written in the background)
    optimizer: dict[str, Any] | None  # None: written sharded by every rank (optimizer-sharded/)
    rng: dict[str, Any]
    parts: dict[str, Any]
    trainer_state: str  # trainer_state.json, serialised when captured
    ledger: dict[str, Any]  # the ledger as of this step (the view RUN/ledger.json moves to once published)

    def write(self, directory: Path) -> None:
        """The checkpoint's files into ``directory`` (CheckpointManager makes them durable)."""
        # A shallow copy: save_pretrained pops the tensors it has written from the dict it is given.
        self.model.save_pretrained(directory, state_dict=dict(self.weights), safe_serialization=True)
        save_tokenizer(self.tokenizer, directory)  # after the model: it reads config.json for the length
        if self.optimizer is not None:
            save_optimizer_state(directory, self.optimizer)
        save_tree(directory / "rng", self.rng)
        save_tree(directory / "parts", self.parts)
        (directory / TRAINER_STATE).write_text(self.trainer_state, encoding="utf-8")


def host_copy(tree: Any, *, copy: bool) -> Any:
    """``tree`` with every tensor in CPU memory; with ``copy``, memory that training will not touch.

    Without ``copy`` a CPU tensor is returned as is (detached) and only accelerator tensors are
    copied: enough when training waits for the write. Tensors that share memory (tied input and
    output embeddings) still share it in the result, so ``save_pretrained`` recognises the tie
    and writes the weight once, as it does for the live model. NumPy arrays are copied with
    ``copy``; containers are rebuilt; other values are immutable and kept.
    """
    copies: dict[tuple[Any, ...], torch.Tensor] = {}

    def visit(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            tensor = node.detach()
            if tensor.device.type == "cpu" and not copy:
                return tensor
            key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                   tensor.stride(), tensor.dtype, str(tensor.device))
            if key not in copies:
                copies[key] = tensor.to("cpu", copy=True)
            return copies[key]
        if isinstance(node, np.ndarray):
            return node.copy() if copy else node
        if isinstance(node, dict):
            return {key: visit(value) for key, value in node.items()}
        if isinstance(node, list):
            return [visit(value) for value in node]
        if isinstance(node, tuple):
            return tuple(visit(value) for value in node)
        return node

    return visit(tree)
