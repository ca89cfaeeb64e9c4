"""Optimiser state without pickle: optimizer.safetensors + optimizer.json, and old optimizer.pt checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from olm_cli.errors import CheckpointLoadError
from olm_cli.rundir.optimizer_state import (
    LEGACY_OPTIMIZER_FILE,
    load_optimizer_state,
    optimizer_file_label,
    save_optimizer_state,
)


def _trained(seed: int = 0, steps: int = 3) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A small model and fused AdamW with two parameter groups (as build_optimizer makes), after ``steps``."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    decay = [model[0].weight, model[2].weight]
    no_decay = [model[0].bias, *model[1].parameters(), model[2].bias]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    for _ in range(steps):
        _step(model, optimizer)
    return model, optimizer


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 6)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _continue(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> list[torch.Tensor]:
    torch.manual_seed(99)
    for _ in range(steps):
        _step(model, optimizer)
    return [p.detach().clone() for p in model.parameters()]


def test_round_trip_rebuilds_the_exact_state_dict(tmp_path: Path) -> None:
    _, optimizer = _trained()
    saved = optimizer.state_dict()
    save_optimizer_state(tmp_path, saved)

    loaded = load_optimizer_state(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    assert loaded["param_groups"] == saved["param_groups"]
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    assert list(loaded["state"]) == list(saved["state"]) and all(isinstance(k, int) for k in loaded["state"])
    for param, values in saved["state"].items():
        assert loaded["state"][param].keys() == values.keys()
        for name, tensor in values.items():
            assert loaded["state"][param][name].dtype == tensor.dtype, (param, name)
            assert torch.equal(loaded["state"][param][name], tensor), (param, name)
    # The structure is plain JSON: nothing in the checkpoint is unpickled.
    structure = json.loads((tmp_path / "optimizer.json").read_text())
    assert structure["param_groups"][0]["tuples"] == ["betas"]


def test_restored_optimizer_continues_bit_identically(tmp_path: Path) -> None:
    model, optimizer = _trained()
    save_optimizer_state(tmp_path, optimizer.state_dict())
    resumed_model, resumed = _trained(steps=0)
    resumed_model.load_state_dict(model.state_dict())
    resumed.load_state_dict(load_optimizer_state(tmp_path))

    expected = _continue(model, optimizer)
    got = _continue(resumed_model, resumed)

    assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_empty_state_round_trips(tmp_path: Path) -> None:
    _, optimizer = _trained(steps=0)  # fresh moments: no tensors at all
    save_optimizer_state(tmp_path, optimizer.state_dict())
    assert load_optimizer_state(tmp_path) == optimizer.state_dict()


def test_a_checkpoint_of_olm_0_2_with_optimizer_pt_still_loads(tmp_path: Path) -> None:
    _, optimizer = _trained()
    torch.save(optimizer.state_dict(), tmp_path / LEGACY_OPTIMIZER_FILE)

    loaded = load_optimizer_state(tmp_path)

    assert optimizer_file_label(tmp_path) == LEGACY_OPTIMIZER_FILE
    assert torch.equal(loaded["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


def test_new_files_win_over_a_leftover_optimizer_pt(tmp_path: Path) -> None:
    _, optimizer = _trained()
    (tmp_path / LEGACY_OPTIMIZER_FILE).write_bytes(b"not even a torch file")
    save_optimizer_state(tmp_path, optimizer.state_dict())

    assert optimizer_file_label(tmp_path) == "optimizer.json"
    assert load_optimizer_state(tmp_path)["param_groups"] == optimizer.state_dict()["param_groups"]


def test_unreadable_tensors_are_a_checkpoint_load_error(tmp_path: Path) -> None:
    _, optimizer = _trained()
    save_optimizer_state(tmp_path, optimizer.state_dict())
    tensors = tmp_path / "optimizer.safetensors"
    tensors.write_bytes(b"\xff" * tensors.stat().st_size)

    with pytest.raises(CheckpointLoadError, match=r"optimizer\.safetensors is unreadable"):
        load_optimizer_state(tmp_path)


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    _, optimizer = _trained()
    save_optimizer_state(tmp_path, optimizer.state_dict())
    structure = tmp_path / "optimizer.json"
    structure.write_text(structure.read_text().replace('"format": 1', '"format": 7'))

    with pytest.raises(ValueError, match="format 7"):
        load_optimizer_state(tmp_path)
