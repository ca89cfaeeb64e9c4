"""A checkpoint's state captured at a step boundary: host copies that training cannot change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from olm_cli.checkpoint_snapshot import host_copy


def test_copy_is_memory_training_cannot_touch() -> None:
    live = {"moments": [torch.ones(3)], "centroids": np.zeros(2), "step": 4, "betas": (0.9, torch.tensor(1.0))}
    snapshot = host_copy(live, copy=True)

    live["moments"][0].add_(1)  # what an optimizer step does in place
    live["centroids"] += 5
    live["betas"][1].add_(1)

    assert torch.equal(snapshot["moments"][0], torch.ones(3))
    assert np.array_equal(snapshot["centroids"], np.zeros(2))
    assert isinstance(snapshot["betas"], tuple) and float(snapshot["betas"][1]) == 1.0
    assert snapshot["step"] == 4


def test_without_copy_cpu_tensors_are_shared() -> None:
    live = {"weight": torch.ones(3)}
    snapshot = host_copy(live, copy=False)
    live["weight"].add_(1)
    assert torch.equal(snapshot["weight"], live["weight"])


def test_tied_weights_stay_tied_so_save_pretrained_writes_them_once(tmp_path: Path) -> None:
    model = tiny_llama(tie_word_embeddings=True)
    weights = host_copy(model.state_dict(), copy=True)
    assert weights["lm_head.weight"].data_ptr() == weights["model.embed_tokens.weight"].data_ptr()
    assert weights["lm_head.weight"].data_ptr() != model.lm_head.weight.data_ptr()

    model.save_pretrained(tmp_path / "live", safe_serialization=True)
    model.save_pretrained(tmp_path / "snapshot", state_dict=dict(weights), safe_serialization=True)

    live = (tmp_path / "live" / "model.safetensors").read_bytes()
    assert (tmp_path / "snapshot" / "model.safetensors").read_bytes() == live
    assert "lm_head.weight" not in load_file(str(tmp_path / "snapshot" / "model.safetensors"))
