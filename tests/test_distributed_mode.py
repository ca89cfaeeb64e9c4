"""How a launch trains (olm_cli/distributed/mode.py) and the recipe checks of run.distributed: fsdp."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import cli

from olm_cli.distributed import resolve_mode
from olm_cli.errors import EXIT_USAGE, RecipeError
from olm_cli.recipe import recipe_from_dict

ACCELERATE_FSDP2 = {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}


@pytest.mark.parametrize(("requested", "env", "expected"), [
    ("auto", {}, ("single", 1)),
    ("auto", {"WORLD_SIZE": "2"}, ("ddp", 2)),
    ("ddp", {"WORLD_SIZE": "4"}, ("ddp", 4)),
    ("fsdp", {}, ("fsdp", 1)),  # one process, sharded over a group of one (bench_gpu --fsdp)
    ("fsdp", {"WORLD_SIZE": "2"}, ("fsdp", 2)),
    ("auto", ACCELERATE_FSDP2, ("fsdp", 2)),  # accelerate launch --use_fsdp --fsdp_version 2
    ("fsdp", ACCELERATE_FSDP2, ("fsdp", 2)),
    ("auto", {"WORLD_SIZE": "2", "ACCELERATE_USE_DEEPSPEED": "true"}, ("deepspeed", 2)),
])
def test_mode_follows_the_recipe_and_the_launcher(requested: str, env: dict[str, str],
                                                   expected: tuple[str, int]) -> None:
    mode = resolve_mode(requested, env)
    assert (mode.name, mode.world_size) == expected
    assert mode.sharded == (expected[0] == "fsdp")


def test_reshard_after_forward_comes_from_the_launcher() -> None:
    assert resolve_mode("auto", {**ACCELERATE_FSDP2, "FSDP_RESHARD_AFTER_FORWARD": "false"}).reshard_after_forward is False
    assert resolve_mode("auto", ACCELERATE_FSDP2).reshard_after_forward is True


@pytest.mark.parametrize(("requested", "env", "message"), [
    ("auto", {"ACCELERATE_USE_FSDP": "true"}, "--fsdp_version 1: olm shards with FSDP2 only"),  # accelerate's default
    ("auto", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "--fsdp_version 1"),
    ("ddp", ACCELERATE_FSDP2, "run.distributed is 'ddp' but the launch asks for FSDP"),
    ("auto", {**ACCELERATE_FSDP2, "FSDP_OFFLOAD_PARAMS": "true"}, "--fsdp_offload_params"),
    ("auto", {**ACCELERATE_FSDP2, "FSDP_ACTIVATION_CHECKPOINTING": "true"}, "--fsdp_activation_checkpointing"),
    ("fsdp", {"ACCELERATE_USE_DEEPSPEED": "true"}, "DeepSpeed"),
    ("auto", {"WORLD_SIZE": "two"}, "WORLD_SIZE"),
])
def test_a_launch_olm_cannot_shard_is_refused(requested: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(RecipeError, match=message) as info:
        resolve_mode(requested, env)
    assert "\n" not in str(info.value)
    assert info.value.exit_code == EXIT_USAGE


@pytest.mark.parametrize(("sections", "message"), [
    ({"run": {"mixed_precision": "fp16"}}, "use run.mixed_precision bf16"),
    ({"train": {"lora": {"r": 4}}}, "train.lora"),
])
def test_recipe_refuses_what_fsdp_cannot_shard(tmp_path: Path, sections: dict, message: str) -> None:
    recipe = tiny_recipe(tmp_path, **sections)
    recipe["run"]["distributed"] = "fsdp"
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict(recipe)
    recipe["run"]["distributed"] = "ddp"
    recipe_from_dict(recipe)  # the same recipe is fine unsharded


@pytest.mark.parametrize("sections", [
    {"regularize": {"method": "ewc"}},
    {"regularize": {"method": "l2"}},
    {"optim": {"schedule": "wsd"}},
    {"optim": {"meta": {"method": "reptile"}}},
])
def test_recipe_shards_the_parts_that_keep_weight_copies(tmp_path: Path, sections: dict) -> None:
    """Their anchors and the cooldown branch are sharded like the weights (tests/test_distributed_parts.py)."""
    recipe = tiny_recipe(tmp_path, **sections)
    recipe["run"]["distributed"] = "fsdp"
    assert recipe_from_dict(recipe).run.distributed == "fsdp"


def test_accelerate_fsdp_version_1_launch_exits_2_with_one_line(tmp_path: Path, monkeypatch) -> None:
    """What `accelerate launch --use_fsdp --fsdp_version 1 -m olm_cli train` hands each process."""
    add_shard(tmp_path / "stream", "alpha", 0, docs=4)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    result = cli("train", "--config", recipe)
    assert result.code == EXIT_USAGE, result.text
    errors = [line for line in result.err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and "--fsdp_version 2" in errors[0], result.text
    assert "Traceback" not in result.text
