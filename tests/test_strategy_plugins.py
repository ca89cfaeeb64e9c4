"""Adding a strategy is one file plus one registry line, also from outside the package.

The toy distiller and regulariser below live in this test module (outside ``olm_cli``), are
registered under new names, named in a recipe, and trained with through the real ``olm train``:
the engine calls them, checkpoints their state and restores it, without knowing them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import cli, latest

from olm_cli.distill import DISTILLERS
from olm_cli.regularize import REGULARIZERS
from olm_cli.state_files import load_tree
from olm_cli.strategy import Registry, StrategyContext

CALLS: dict[str, int] = {}


class MeanLogitDistiller:
    """A toy: pulls the mean logit toward zero (any scalar that depends on the logits will do)."""

    name = "mean_logit"
    needs_stored_logits = False

    def __init__(self, config: Any, context: StrategyContext) -> None:
        self.steps = 0

    def begin_increment(self, model: torch.nn.Module, start: Any) -> None:
        CALLS["begin"] = CALLS.get("begin", 0) + 1

    def loss(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor], stored: Any = None) -> torch.Tensor:
        self.steps += 1
        return student_logits.float().mean() ** 2

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        CALLS["restored_steps"] = int(state.get("steps", 0))
        self.steps = int(state.get("steps", 0))


class SumOfSquaresRegularizer:
    """A toy: a tiny weight decay toward zero, counting its increments in its state."""

    name = "sum_of_squares"

    def __init__(self, config: Any, context: StrategyContext) -> None:
        self.increments = 0

    def begin_increment(self, model: torch.nn.Module) -> None:
        pass

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        CALLS["penalty"] = CALLS.get("penalty", 0) + 1
        return 1e-6 * sum(p.float().pow(2).sum() for p in model.parameters() if p.requires_grad)

    def end_increment(self, model: torch.nn.Module, data: Any) -> None:
        self.increments += 1

    def state_dict(self) -> dict[str, Any]:
        return {"increments": self.increments}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.increments = int(state.get("increments", 0))


@pytest.fixture
def registered() -> Iterator[None]:
    CALLS.clear()
    DISTILLERS.register("mean_logit", MeanLogitDistiller)
    REGULARIZERS.register("sum_of_squares", SumOfSquaresRegularizer)
    try:
        yield
    finally:
        DISTILLERS.unregister("mean_logit")
        REGULARIZERS.unregister("sum_of_squares")


@pytest.mark.slow
def test_a_distiller_and_a_regulariser_registered_outside_the_package_train_through_olm_train(
    tmp_path, registered
) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, distill={"method": "mean_logit"},
                                                regularize={"method": "sum_of_squares"}, run={"checkpoint_every": 3}))
    add_shard(tmp_path / "stream", "alpha", 0, docs=8)

    result = cli("train", "--config", recipe)

    assert result.code == 0, result.text
    assert CALLS["begin"] == 1 and CALLS["penalty"] > 0
    parts = load_tree(latest(tmp_path / "run") / "parts")
    assert parts["distiller"]["steps"] > 0  # the engine checkpointed the toy's own state
    assert parts["regularizer"] == {"increments": 1}

    add_shard(tmp_path / "stream", "beta", 0, docs=8)
    assert cli("train", "--config", recipe).code == 0
    assert CALLS["restored_steps"] == parts["distiller"]["steps"]  # ...and restored it for the next increment
    assert load_tree(latest(tmp_path / "run") / "parts")["regularizer"] == {"increments": 2}


def test_an_unregistered_name_is_a_recipe_error_with_a_hint(tmp_path) -> None:
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, distill={"method": "mean_logits"}))
    result = cli("validate", "--config", recipe)
    assert result.code == 2, result.text
    assert result.has("distill.method: unknown distill method 'mean_logits'"), result.text


def test_registry_contract() -> None:
    toys: Registry[Any] = Registry("toy", "kind")
    toys.register("a", lambda config, context: ("built", config.kind, context.seed))
    toys.register("b", "olm_cli.strategy:StrategyContext")  # a string factory is imported on first use

    class Config:
        kind = "a"

    assert toys.build(Config(), StrategyContext(seed=7)) == ("built", "a", 7)
    assert list(toys) == ["a", "b"] and "b" in toys
    with pytest.raises(ValueError, match="already registered"):
        toys.register("a", dict)
    with pytest.raises(ValueError, match=r"unknown toy kind 'c' \(choose from 'a', 'b'\)"):
        toys.check("c")
