"""FSDP2 sharding and the sharded optimiser checkpoint (olm_cli/distributed), in one process (a group of one).

The multi-process behaviour (two ranks, kill -9, another world size) is in test_distributed.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_llama, tiny_recipe

from olm_cli.distributed.sharded_checkpoint import (
    SHARDED_OPTIMIZER_DIR,
    restore_optimizer,
    save_sharded_optimizer,
)
from olm_cli.distributed.sharding import (
    decoder_layers,
    ensure_process_group,
    is_sharded,
    local,
    nonfinite_parameters,
    shard_model,
    unsharded_copy,
)
from olm_cli.engine import build_optimizer
from olm_cli.recipe import recipe_from_dict
from olm_cli.rundir.optimizer_state import optimizer_file_label, save_optimizer_state

# Building FSDP2's machinery costs seconds on first use: outside the fast loop.
pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


@pytest.fixture
def group() -> Iterator[None]:
    ensure_process_group(CPU)
    yield
    dist.destroy_process_group()


def _train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
    generator = torch.Generator().manual_seed(7)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 12), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _trained(tmp_path: Path, *, sharded: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = tiny_llama(seed=3)
    if sharded:
        shard_model(model, device=CPU, mixed_precision="no")
    optimizer = build_optimizer(model, recipe_from_dict(tiny_recipe(tmp_path)))
    _train(model, optimizer)
    return model, optimizer


def _moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {f"{names[id(p)]}.{key}": local(value).clone() for p, state in optimizer.state.items()
            for key, value in state.items()}


def test_decoder_layers_are_sharded_one_by_one(group: None) -> None:
    model = tiny_llama()
    layers = decoder_layers(model)
    assert [type(layer).__name__ for layer in layers] == ["LlamaDecoderLayer"] * 2
    shard_model(model, device=CPU, mixed_precision="no")
    assert is_sharded(model) and all(is_sharded(layer) for layer in layers)


def test_sharded_optimizer_round_trip_is_exact(tmp_path: Path, group: None) -> None:
    model, optimizer = _trained(tmp_path, sharded=True)
    save_sharded_optimizer(tmp_path / "ckpt", model, optimizer)
    assert (tmp_path / "ckpt" / SHARDED_OPTIMIZER_DIR / ".metadata").is_file()
    assert optimizer_file_label(tmp_path / "ckpt") == f"{SHARDED_OPTIMIZER_DIR}/"

    fresh = tiny_llama(seed=3)
    shard_model(fresh, device=CPU, mixed_precision="no")
    fresh_optimizer = build_optimizer(fresh, recipe_from_dict(tiny_recipe(tmp_path)))
    assert restore_optimizer(tmp_path / "ckpt", fresh, fresh_optimizer, sharded=True)
    want, got = _moments(model, optimizer), _moments(fresh, fresh_optimizer)
    assert want.keys() == got.keys() and len(want) > 0
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_sharded_optimizer_loads_into_an_unsharded_model(tmp_path: Path, group: None) -> None:
    """A run that trained with fsdp continues with ddp or one process: DCP reshards on load."""
    model, optimizer = _trained(tmp_path, sharded=True)
    save_sharded_optimizer(tmp_path / "ckpt", model, optimizer)
    plain, plain_optimizer = _trained(tmp_path, sharded=False)  # same seed and data: same moments, unsharded
    for state in plain_optimizer.state.values():
        for value in state.values():
            value.zero_()
    assert restore_optimizer(tmp_path / "ckpt", plain, plain_optimizer, sharded=False)
    want, got = _moments(model, optimizer), _moments(plain, plain_optimizer)
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_whole_optimizer_state_loads_into_a_sharded_model(tmp_path: Path, group: None) -> None:
    """A run that trained unsharded continues with fsdp: its optimizer.safetensors is cut into shards."""
    plain, plain_optimizer = _trained(tmp_path, sharded=False)
    save_optimizer_state(tmp_path / "ckpt", plain_optimizer.state_dict())
    assert not restore_optimizer(tmp_path / "ckpt", plain, plain_optimizer, sharded=False)  # the caller's format
    model = tiny_llama(seed=3)
    shard_model(model, device=CPU, mixed_precision="no")
    optimizer = build_optimizer(model, recipe_from_dict(tiny_recipe(tmp_path)))
    assert restore_optimizer(tmp_path / "ckpt", model, optimizer, sharded=True)
    want, got = _moments(plain, plain_optimizer), _moments(model, optimizer)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


def test_unsharded_copy_and_nonfinite_check(tmp_path: Path, group: None) -> None:
    model, _ = _trained(tmp_path, sharded=True)
    copy = unsharded_copy(model, device=CPU)
    assert copy is not None and not is_sharded(copy)
    for name, param in model.named_parameters():
        assert torch.equal(param.full_tensor(), copy.get_parameter(name)), name
    assert nonfinite_parameters(model) == []
    with torch.no_grad():
        local(model.get_parameter("model.norm.weight"))[0] = float("nan")
    assert nonfinite_parameters(model) == ["model.norm.weight"]


def test_accumulation_without_gradient_sync_matches_unsharded(tmp_path: Path, group: None) -> None:
    """Micro-batches before the last skip the reduce-scatter; the last one reduces all of them."""
    from olm_cli.distributed.sharding import gradient_sync

    plain, model = tiny_llama(seed=5), tiny_llama(seed=5)
    shard_model(model, device=CPU, mixed_precision="no")
    chunks = torch.randint(0, 64, (3, 2, 12), generator=torch.Generator().manual_seed(1))
    for index, ids in enumerate(chunks):
        plain(input_ids=ids, labels=ids).loss.backward()
        with gradient_sync(model, index == len(chunks) - 1):
            model(input_ids=ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        expected = plain.get_parameter(name).grad
        assert expected is not None and param.grad is not None, name
        torch.testing.assert_close(param.grad.full_tensor(), expected, rtol=1e-5, atol=1e-7, msg=name)
