"""The learning-rate shapes of ``olm_cli/schedule.py``: WSD's trunk and its cooldown branch."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from olm_cli.errors import RecipeError
from olm_cli.recipe import load_recipe
from olm_cli.schedule import cooldown_multiplier, cooldown_steps, wsd_multiplier


def test_wsd_warms_up_once_per_run_then_stays_constant_through_every_increment() -> None:
    # global_step counts since the run began: the second increment (say from step 40) never re-warms.
    assert [wsd_multiplier(s, warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert {wsd_multiplier(s, warmup=4) for s in range(4, 500)} == {1.0}
    assert wsd_multiplier(0, warmup=0) == 1.0


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_cooldown_falls_monotonically_from_the_peak_to_the_floor(shape: str) -> None:
    steps = 10
    rates = [cooldown_multiplier(i, steps, shape=shape, min_ratio=0.1) for i in range(steps)]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False)), rates
    assert rates[0] < 1.0  # every branch step is below the trunk's rate
    assert rates[-1] == pytest.approx(0.1)  # the last step trains at lr * min_lr_ratio


def test_cooldown_shapes_follow_their_formulas() -> None:
    p = 3 / 8  # step 2 of 8
    assert cooldown_multiplier(2, 8, shape="linear", min_ratio=0.0) == pytest.approx(1 - p)
    assert cooldown_multiplier(2, 8, shape="cosine", min_ratio=0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * p)))
    assert cooldown_multiplier(2, 8, shape="sqrt", min_ratio=0.2) == pytest.approx(0.2 + 0.8 * (1 - math.sqrt(p)))
    with pytest.raises(ValueError, match="unknown cooldown shape"):
        cooldown_multiplier(0, 8, shape="step", min_ratio=0.0)


def test_cooldown_length_is_a_fraction_of_the_increment_and_at_least_one_step() -> None:
    assert cooldown_steps(100, 0.1) == 10
    assert cooldown_steps(7, 0.5) == 4
    assert cooldown_steps(3, 0.1) == 1
    assert cooldown_steps(40, 1.0) == 40


def test_recipe_accepts_the_wsd_keys(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(
        tmp_path, optim={"schedule": "wsd", "cooldown_fraction": 0.2, "cooldown_shape": "cosine"},
        release={"merge": "sma", "merge_last": 2})))
    assert (recipe.optim.schedule, recipe.optim.cooldown_fraction, recipe.optim.cooldown_shape) == ("wsd", 0.2, "cosine")
    assert (recipe.release.merge, recipe.release.merge_last) == ("sma", 2)


def test_sma_needs_the_checkpoints_it_averages(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, release={"merge": "sma", "merge_last": 5},
                                              run={"keep_checkpoints": 3}))
    with pytest.raises(RecipeError, match=r"release.merge_last \(5\).*run.keep_checkpoints \(3\)"):
        load_recipe(path)


@pytest.mark.parametrize(("key", "value"), [("cooldown_fraction", 0), ("cooldown_fraction", 1.5),
                                            ("cooldown_shape", "step")])
def test_bad_cooldown_settings_name_their_key(tmp_path: Path, key: str, value: object) -> None:
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, optim={"schedule": "wsd", key: value}))
    with pytest.raises(RecipeError, match=f"optim.{key}"):
        load_recipe(path)
