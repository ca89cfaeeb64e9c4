"""Forgetting countermeasures driven through the engine: LwF, teacher, EWC, trainable patterns, LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import add_shard, tiny_recipe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from olm_cli.errors import RecipeError
from olm_cli.increment import run_increment
from olm_cli.recipe import recipe_from_dict
from olm_cli.state_files import load_tree


def _two_increments(tmp_path: Path, **sections: dict) -> Path:
    recipe = recipe_from_dict(tiny_recipe(tmp_path, **sections))
    add_shard(tmp_path / "stream", "alpha", 0)
    assert run_increment(recipe).status == "increment_complete"
    add_shard(tmp_path / "stream", "beta", 0)
    assert run_increment(recipe).status == "increment_complete"
    return tmp_path / "run"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "latest" / "model.safetensors"))


@pytest.mark.slow
def test_lwf_and_ewc_run_and_persist_their_state(tmp_path: Path) -> None:
    run = _two_increments(tmp_path, distill={"method": "lwf", "alpha": 0.5},
                          regularize={"method": "ewc", "strength": 10.0, "fisher_batches": 2})
    latest = run / "checkpoints" / "latest"
    regularizer = load_tree(latest / "parts")["regularizer"]  # the part's state_dict, with the others
    assert regularizer["method"] == "ewc" and regularizer["estimates"] == 2
    assert regularizer["fisher"] and set(regularizer["fisher"]) == set(regularizer["anchor"])
    assert json.loads((run / "increment-start" / "increment.json").read_text())["increment"] == 2
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


@pytest.mark.slow
def test_teacher_distillation_from_a_checkpoint_and_vocab_mismatch(tmp_path: Path) -> None:
    teacher_run = tmp_path / "teacher"
    teacher_run.mkdir()
    _two_increments(teacher_run)
    teacher = str(teacher_run / "run" / "checkpoints" / "latest")
    student = tmp_path / "student"
    student.mkdir()
    # A from-scratch student trains its own tokenizer: same size here (same text), so it runs...
    run = _two_increments(student, distill={"method": "teacher", "teacher": teacher, "alpha": 0.3})
    assert (run / "checkpoints" / "latest" / "model.safetensors").exists()
    # ...while a teacher with another vocabulary is refused with both sizes named.
    other = tmp_path / "other"
    other.mkdir()
    recipe = tiny_recipe(other, distill={"method": "teacher", "teacher": teacher})
    recipe["model"]["arch"]["vocab_size"] = 400
    add_shard(other / "stream", "alpha", 0, docs=60)
    with pytest.raises(RecipeError, match="vocab"):
        run_increment(recipe_from_dict(recipe))


def test_trainable_patterns_freeze_everything_else(tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0)
    first = recipe_from_dict(tiny_recipe(tmp_path, run={"max_steps": 2}))
    run_increment(first)
    before = _weights(tmp_path / "run")
    add_shard(tmp_path / "stream", "beta", 0)
    frozen = recipe_from_dict(tiny_recipe(tmp_path, train={"trainable": ["lm_head.*", "model.layers.0.*"]},
                                          run={"max_steps": 3}))
    run_increment(frozen)
    after = _weights(tmp_path / "run")
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert not torch.equal(before["model.layers.0.mlp.up_proj.weight"], after["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(before["model.layers.1.mlp.up_proj.weight"], after["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


def test_lora_checkpoints_are_merged_plain_models(tmp_path: Path) -> None:
    run = _two_increments(tmp_path, train={"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
                          run={"max_steps": 3})
    latest = run / "checkpoints" / "latest"
    names = set(_weights(run))
    assert not any("lora" in name for name in names)
    model = AutoModelForCausalLM.from_pretrained(latest)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_a_lora_increment_stopped_and_resumed_ends_bit_identical(tmp_path: Path) -> None:
    """The checkpoint holds merged weights; the partial-updates part keeps the adapters and the
    base weights under them, so a resumed LoRA increment continues exactly where it stopped."""
    lora = {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}
    reference = recipe_from_dict(tiny_recipe(tmp_path / "reference", train=lora, run={"max_steps": 4}))
    add_shard(tmp_path / "reference" / "stream", "alpha", 0)
    assert run_increment(reference).status == "increment_complete"

    # A budget shorter than start-up: the first run trains one step and checkpoints it.
    stopped = tiny_recipe(tmp_path / "trial", train=lora, run={"max_steps": 4, "time_budget": 0.001})
    add_shard(tmp_path / "trial" / "stream", "alpha", 0)
    assert run_increment(recipe_from_dict(stopped)).status == "time_budget"
    stopped["run"]["time_budget"] = 600
    assert run_increment(recipe_from_dict(stopped)).status == "increment_complete"

    expected = _weights(tmp_path / "reference" / "run")
    resumed = _weights(tmp_path / "trial" / "run")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, resumed[name]), name
