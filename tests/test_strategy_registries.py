"""The selector, batch and replay registries: every name builds, recipes validate names against
them (a strategy registered from outside olm included), and an unknown name is one recipe error."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import cli

from olm_cli.batching import BATCH_POLICIES, BatchConfig, BatchPolicy, StepStats
from olm_cli.errors import RecipeError
from olm_cli.recipe import recipe_from_dict
from olm_cli.replay import REPLAY_BUFFERS, REPLAY_POLICIES, ReplayBuffer, ReplayConfig
from olm_cli.samples import Block
from olm_cli.selectors import SELECTORS, Selection, Selector, SelectorConfig
from olm_cli.state_files import load_tree
from olm_cli.strategy import StrategyContext


@pytest.mark.parametrize("name", SELECTORS.names())
def test_every_selector_name_builds_its_selector(name: str) -> None:
    selector = SELECTORS.build(SelectorConfig(name=name, pool_factor=3), StrategyContext(seed=5))
    assert isinstance(selector, Selector)
    assert selector.name == name and selector.pool_factor == 3


@pytest.mark.parametrize("name", BATCH_POLICIES.names())
def test_every_batch_policy_name_builds_its_policy(name: str) -> None:
    own_keys = {"period_samples": 6} if name == "periodic" else {}
    config = BatchConfig(policy=name, size=6, micro_batch=2, **own_keys)
    policy = BATCH_POLICIES.build(config, StrategyContext(memory_probe=lambda: None))
    assert isinstance(policy, BatchPolicy)
    assert policy.name == name and policy.plan().samples == 6


def test_the_resource_policy_reads_its_memory_probe_from_the_context() -> None:
    readings: list[str] = []

    def probe() -> None:
        readings.append("read")

    policy = BATCH_POLICIES.build(BatchConfig(policy="resource"), StrategyContext(memory_probe=probe))
    policy.observe(StepStats(loss=1.0, grad_norm=1.0, samples=8, tokens=256, seconds=0.1))
    assert readings == ["read"]


@pytest.mark.parametrize("name", REPLAY_BUFFERS.names())
def test_every_replay_policy_name_builds_a_buffer(name: str, tmp_path: Path) -> None:
    buffer = REPLAY_BUFFERS.build(ReplayConfig(policy=name), StrategyContext(run_dir=tmp_path))
    assert isinstance(buffer, ReplayBuffer) and buffer.policy_name == name
    buffer.close()
    assert name == "none" or name in REPLAY_POLICIES


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("selector", {"name": "entrpy"}, "selector.name: unknown selector name 'entrpy'; did you mean 'entropy'?"),
        ("batch", {"policy": "adaptve"}, "batch.policy: unknown batch policy 'adaptve'; did you mean 'adaptive'?"),
        ("replay", {"policy": "resevoir"}, "replay.policy: unknown replay policy 'resevoir'; did you mean 'reservoir'?"),
    ],
)
def test_an_unknown_strategy_name_is_a_recipe_error_with_a_hint(
    tmp_path: Path, section: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(RecipeError) as err:
        recipe_from_dict(tiny_recipe(tmp_path, **{section: values}))
    assert message in str(err.value)
    assert "(choose from " in str(err.value)


# -- a selector registered from outside olm -----------------------------------------------------


class FirstOfPoolSelector:
    """A plugin selector: keeps the first ``k`` candidates, remembers how often it chose."""

    name = "first_of_pool"
    needs_model = False
    contexts: list[StrategyContext] = []

    def __init__(self, config: SelectorConfig, context: StrategyContext) -> None:
        self.pool_factor = config.pool_factor
        self.calls = 0
        FirstOfPoolSelector.contexts.append(context)

    def select(self, model: torch.nn.Module, blocks: Sequence[Block], k: int, pad_id: int) -> Selection:
        self.calls += 1
        k = max(0, min(k, len(blocks)))
        return Selection(indices=list(range(k)), scores=None, weights=None, unselected=len(blocks) - k)

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


@pytest.fixture
def plugin_selector() -> Iterator[type[FirstOfPoolSelector]]:
    FirstOfPoolSelector.contexts = []
    SELECTORS.register(FirstOfPoolSelector.name, FirstOfPoolSelector)
    try:
        yield FirstOfPoolSelector
    finally:
        SELECTORS.unregister(FirstOfPoolSelector.name)


@pytest.mark.slow
def test_a_registered_selector_is_accepted_by_a_recipe_and_trains(
    tmp_path: Path, plugin_selector: type[FirstOfPoolSelector]
) -> None:
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = tiny_recipe(tmp_path, selector={"name": "first_of_pool", "pool_factor": 2}, run={"max_steps": 3, "seed": 11})
    result = cli("train", "--config", write_recipe(tmp_path, recipe))
    assert result.code == 0, result.text
    (context,) = plugin_selector.contexts
    assert context.seed == 11 and context.run_dir == tmp_path / "run"
    parts = load_tree(tmp_path / "run" / "checkpoints" / "latest" / "parts")
    assert parts["selector"] == {"name": "first_of_pool", "calls": 3}  # checkpointed like any selector
    # Keys of the built-in selectors do not apply to it; it is named in the message.
    recipe["selector"]["mode"] = "sample"
    refused = cli("validate", "--config", write_recipe(tmp_path, recipe, "refused.yaml"))
    assert refused.code == 2
    assert refused.has("selector.mode: applies to selectors 'entropy', 'loss', 'gradnorm', 'diversity', 'coverage', not 'first_of_pool'")


def test_an_unregistered_selector_is_refused_again(tmp_path: Path) -> None:
    assert "first_of_pool" not in SELECTORS
    with pytest.raises(RecipeError, match="unknown selector name 'first_of_pool'"):
        recipe_from_dict(tiny_recipe(tmp_path, selector={"name": "first_of_pool"}))
