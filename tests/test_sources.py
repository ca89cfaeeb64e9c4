"""Model and data sources end to end through `olm train`: GGUF file, local HF directory, streamed dataset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import add_shard, make_documents, tiny_recipe, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from olm_cli.errors import RecipeError
from olm_cli.increment import run_increment as train
from olm_cli.modeling import load_source, train_tokenizer
from olm_cli.recipe import ModelConfig, recipe_from_dict


def _pretrained_recipe(tmp_path: Path, model: dict) -> dict:
    recipe = tiny_recipe(tmp_path)
    recipe["model"] = model
    recipe["run"]["max_steps"] = 3
    return recipe


def test_gguf_source_trains_and_saves_plain_safetensors(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from gguf_fixture import write_tiny_llama_gguf

    info = write_tiny_llama_gguf(tmp_path / "gguf" / "tiny.gguf")
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = recipe_from_dict(_pretrained_recipe(tmp_path, {"name_or_path": str(tmp_path / "gguf"), "gguf_file": info["gguf_file"]}))
    outcome = train(recipe)
    assert outcome.status == "increment_complete" and outcome.steps == 3
    latest = Path(recipe.run.dir) / "checkpoints" / "latest"
    assert (latest / "model.safetensors").exists()
    assert not list(latest.glob("*.gguf"))
    reloaded = AutoModelForCausalLM.from_pretrained(latest)
    assert reloaded.config.vocab_size == info["config"].vocab_size
    # training moved the weights away from the GGUF ones
    moved = reloaded.state_dict()["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(moved, info["state_dict"]["model.layers.0.mlp.up_proj.weight"])
    assert AutoTokenizer.from_pretrained(latest).eos_token_id == info["eos_token_id"]


def test_local_hf_directory_source(tmp_path: Path) -> None:
    shard = add_shard(tmp_path / "stream", "alpha", 0)
    tokenizer = train_tokenizer([shard], "text", vocab_size=300, limit_chars=50_000)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    recipe = recipe_from_dict(_pretrained_recipe(tmp_path, {"name_or_path": str(tmp_path / "base")}))
    outcome = train(recipe)
    assert outcome.steps == 3
    assert AutoModelForCausalLM.from_pretrained(Path(recipe.run.dir) / "checkpoints" / "latest").config.hidden_size == 32


def test_missing_model_directory_is_a_recipe_error(tmp_path: Path) -> None:
    cfg = ModelConfig(name_or_path=str(tmp_path / "no-such-model"))
    with pytest.raises(RecipeError, match="no-such-model"):
        load_source(cfg, shards=[], text_field="text", seed=0)


def test_trust_remote_code_is_off_unless_the_recipe_says_so() -> None:
    assert ModelConfig(name_or_path="x").trust_remote_code is False


# With two lanes the dataset (one source) is one lane and the other is empty.
@pytest.mark.parametrize("lanes", [pytest.param("auto", id="auto"), pytest.param(2, id="two-lanes", marks=pytest.mark.slow)])
def test_streamed_dataset_directory_continues_across_increments(tmp_path: Path, lanes: int | str) -> None:
    write_jsonl(tmp_path / "hubdir" / "data" / "train.jsonl", make_documents("beta", 40, 0))
    recipe_dict = tiny_recipe(tmp_path)
    recipe_dict["data"] = {"dataset": str(tmp_path / "hubdir"), "block_size": 32, "lanes": lanes}
    recipe_dict["run"]["max_steps"] = 6
    recipe = recipe_from_dict(recipe_dict)
    steps = []
    for _ in range(10):
        outcome = train(recipe)
        if outcome.status == "nothing_to_do":
            break
        steps.append(outcome.steps)
    assert len(steps) >= 2 and all(s == 6 for s in steps[:-1]) and 0 < steps[-1] <= 6
    assert outcome.status == "nothing_to_do"


def test_streamed_dataset_needs_a_budget(tmp_path: Path) -> None:
    recipe_dict = tiny_recipe(tmp_path)
    recipe_dict["data"] = {"dataset": "some/hub-dataset"}
    with pytest.raises(RecipeError, match="max_steps"):
        recipe_from_dict(recipe_dict)
