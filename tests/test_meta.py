"""Reptile (``optim.meta``): the outer step's arithmetic, its state, and bit-identical resume."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_llama
from e2e_helpers import (
    assert_bit_identical,
    cli,
    last_step,
    latest,
    make_recipe,
    reaped,
    spawn,
    wait_for,
    weights,
)

from olm_cli.errors import RecipeError
from olm_cli.meta import META_UPDATES, MetaConfig, NoMetaUpdate, ReptileUpdate
from olm_cli.recipe import recipe_from_dict
from olm_cli.state_files import load_tree


def _inner_step(model: torch.nn.Module, seed: int) -> None:
    """A stand-in for an optimiser step: a seeded displacement of every weight."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _reptile(inner_steps: int, outer_lr: float) -> ReptileUpdate:
    update = META_UPDATES.build(MetaConfig(method="reptile", inner_steps=inner_steps, outer_lr=outer_lr))
    assert isinstance(update, ReptileUpdate)
    return update


def test_outer_step_moves_the_weights_a_fraction_of_the_window() -> None:
    model = tiny_llama()
    reptile = _reptile(3, 0.25)
    reptile.begin_increment(model)
    start = _weights(model)
    moved = [reptile.after_step(model) for _ in range(2) if _inner_step(model, 1) is None]
    assert moved == [False, False]
    _inner_step(model, 2)
    inner = _weights(model)
    assert reptile.after_step(model) is True  # the k-th step
    for name, param in model.named_parameters():
        expected = start[name] + 0.25 * (inner[name] - start[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-6, atol=1e-7)
    # The next window starts from the outer iterate.
    assert reptile.steps_in_window == 0 and reptile.outer_steps == 1
    for name, param in model.named_parameters():
        assert torch.equal(reptile.anchor[name], param.detach())


def test_the_last_short_window_is_interpolated_at_the_end_of_the_increment() -> None:
    model = tiny_llama()
    reptile = _reptile(8, 0.5)
    reptile.begin_increment(model)
    start = _weights(model)
    _inner_step(model, 3)
    inner = _weights(model)
    assert reptile.after_step(model) is False
    reptile.end_increment(model)
    name, param = next(iter(model.named_parameters()))
    torch.testing.assert_close(param.detach(), start[name] + 0.5 * (inner[name] - start[name]))
    before = _weights(model)
    reptile.end_increment(model)  # nothing left in the window: no second interpolation
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_outer_lr_one_is_plain_training() -> None:
    model = tiny_llama()
    reptile = _reptile(1, 1.0)
    reptile.begin_increment(model)
    _inner_step(model, 4)
    inner = _weights(model)
    reptile.after_step(model)
    assert all(torch.equal(p.detach(), inner[n]) for n, p in model.named_parameters())


def test_state_round_trip_continues_the_window_identically() -> None:
    """A restored part (mid-window) takes the same outer step as the one that never stopped."""
    model, copy = tiny_llama(), tiny_llama()
    reptile = _reptile(4, 0.3)
    reptile.begin_increment(model)
    for seed in (5, 6):
        _inner_step(model, seed)
        reptile.after_step(model)
    copy.load_state_dict(model.state_dict())
    restored = _reptile(4, 0.3)
    restored.load_state_dict(reptile.state_dict())
    assert restored.steps_in_window == 2
    for target, part in ((model, reptile), (copy, restored)):
        for seed in (7, 8):
            _inner_step(target, seed)
            part.after_step(target)
    assert restored.outer_steps == reptile.outer_steps == 1
    for name, param in model.named_parameters():
        assert torch.equal(param, dict(copy.named_parameters())[name])


def test_frozen_weights_are_left_alone() -> None:
    model = tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    reptile = _reptile(1, 0.5)
    reptile.begin_increment(model)
    assert "model.embed_tokens.weight" not in reptile.anchor
    _inner_step(model, 9)
    frozen = model.model.embed_tokens.weight.detach().clone()
    reptile.after_step(model)
    assert torch.equal(model.model.embed_tokens.weight, frozen)


def test_no_meta_update_is_a_no_op() -> None:
    part = META_UPDATES.build(MetaConfig())
    assert isinstance(part, NoMetaUpdate)
    model = tiny_llama()
    before = _weights(model)
    part.begin_increment(model)
    assert part.after_step(model) is False
    part.end_increment(model)
    assert part.state_dict() == {}
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"method": "reptile", "outer_lr": 1.5}, "optim.meta.outer_lr: Input should be less than or equal to 1"),
        ({"method": "reptile", "inner_steps": 0}, "optim.meta.inner_steps: Input should be greater than or equal to 1"),
        ({"method": "none", "inner_steps": 4}, "optim.meta.inner_steps: applies to optim.meta method 'reptile', not 'none'"),
        ({"method": "reptil"}, "did you mean 'reptile'?"),
    ],
)
def test_recipe_errors_name_the_key(meta: dict[str, Any], message: str) -> None:
    data = {"model": {"init": "scratch"}, "data": {"shards": ["x"]}, "run": {"dir": "r"}, "optim": {"meta": meta}}
    with pytest.raises(RecipeError) as raised:
        recipe_from_dict(data)
    assert message in str(raised.value)


def test_resolved_recipe_keeps_the_meta_keys() -> None:
    data = {"model": {"init": "scratch"}, "data": {"shards": ["x"]}, "run": {"dir": "r"},
            "optim": {"meta": {"method": "reptile", "inner_steps": 5, "outer_lr": 0.2}}}
    dumped = recipe_from_dict(data).model_dump(mode="json")
    assert dumped["optim"]["meta"] == {"method": "reptile", "inner_steps": 5, "outer_lr": 0.2}
    assert recipe_from_dict({**data, "optim": {}}).model_dump(mode="json")["optim"]["meta"] == {"method": "none"}


# --------------------------------------------------------------------------- end to end

REPTILE = {"optim": {"lr": 1e-3, "warmup_steps": 2, "meta": {"method": "reptile", "inner_steps": 4, "outer_lr": 0.5}},
           "run": {"checkpoint_every": 3, "keep_checkpoints": 2}}


def _reptile_recipe(root: Path, **sections: Any) -> Path:
    return make_recipe(root, shards=[("alpha", 0), ("beta", 0)], docs=12, **{**REPTILE, **sections})


@pytest.fixture(scope="module")
def reptile_reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("reptile")
    result = cli("train", "--config", _reptile_recipe(root), "--json")
    assert result.code == 0, result.text
    final = latest(root / "run")
    return {"weights": weights(final), "steps": result.json()["steps"], "meta": load_tree(final / "parts")["meta"]}


@pytest.mark.slow
def test_reptile_trains_and_checkpoints_its_window(reptile_reference: dict[str, Any], tmp_path: Path) -> None:
    steps = reptile_reference["steps"]
    meta = reptile_reference["meta"]
    # Every full window took an outer step, and the last, shorter one too.
    assert meta["outer_steps"] == -(-steps // 4) and meta["steps_in_window"] == 0
    plain = _reptile_recipe(tmp_path, optim={"lr": 1e-3, "warmup_steps": 2})
    assert cli("train", "--config", plain).code == 0
    differs = [n for n, t in weights(latest(tmp_path / "run")).items()
               if not torch.equal(t, reptile_reference["weights"][n])]
    assert differs, "the outer step changed nothing"


@pytest.mark.slow
def test_kill_9_mid_window_then_rerun_is_bit_identical(reptile_reference: dict[str, Any], tmp_path: Path) -> None:
    recipe = _reptile_recipe(tmp_path)
    run_dir = tmp_path / "run"
    # Step 5: after the checkpoint of step 3 (window 2 has begun) and before the next outer step.
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "killed.log")) as proc:
        wait_for(lambda: last_step(run_dir) >= 5, proc, what="step 5")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    for _ in range(3):
        result = cli("train", "--config", recipe, "--json")
        assert result.code == 0, result.text
        if result.json()["status"] in ("increment_complete", "nothing_to_do"):
            break
    assert_bit_identical(weights(latest(run_dir)), reptile_reference["weights"])
