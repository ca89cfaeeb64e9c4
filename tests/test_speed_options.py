"""The speed options a user expects (issue 11, item 6): ``model.attn_implementation``, the causal
attention without a padding mask, ``run.loss_implementation: chunked`` and ``run.compile``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import add_shard, tiny_llama, tiny_recipe, write_recipe
from e2e_helpers import cli

from olm_cli.errors import EXIT_USAGE, RecipeError
from olm_cli.increment import run_increment
from olm_cli.modeling import (
    CAUSAL_SDPA,
    build_scratch_model,
    check_attn_implementation,
    load_pretrained,
    use_causal_attention_only,
)
from olm_cli.recipe import recipe_from_dict
from olm_cli.samples import collate, per_sample_loss


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- attention


def scratch_loss(tmp_path: Path, attn: str) -> torch.Tensor:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({str(i): i for i in range(64)}, "0")),
                                        eos_token="1", pad_token="0")
    recipe = recipe_from_dict(tiny_recipe(tmp_path, model={"attn_implementation": attn}))
    model = build_scratch_model(recipe.model, tokenizer, seed=3)
    assert model.config._attn_implementation == attn
    batch = collate([np.arange(2, 30) % 64, np.arange(5, 19) % 64], pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_loss(logits, batch["labels"])[0]


def test_sdpa_and_eager_attention_give_the_same_loss(tmp_path: Path) -> None:
    torch.testing.assert_close(scratch_loss(tmp_path, "sdpa"), scratch_loss(tmp_path, "eager"), atol=1e-5, rtol=1e-5)


def test_a_checkpoint_is_loaded_with_the_recipes_attention(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(tmp_path / "model")
    assert load_pretrained(str(tmp_path / "model"), attn_implementation="eager").config._attn_implementation == "eager"


def test_flash_attention_without_its_package_or_a_gpu_is_a_recipe_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    check_attn_implementation("sdpa")  # anything else is transformers' to check
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    with pytest.raises(RecipeError, match="needs the flash-attn package"):
        check_attn_implementation("flash_attention_2")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RecipeError, match="needs a CUDA GPU"):
        check_attn_implementation("flash_attention_2")


def test_flash_attention_in_float32_is_refused_by_the_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="flash_attention_2' runs in bf16/fp16 only"):
        recipe_from_dict(tiny_recipe(tmp_path, model={"attn_implementation": "flash_attention_2"}))
    recipe_from_dict(tiny_recipe(tmp_path, model={"attn_implementation": "flash_attention_2"},
                                 run={"mixed_precision": "bf16"}))


def test_olm_train_with_flash_attention_on_this_machine_exits_2_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may run flash attention")
    add_shard(tmp_path / "stream", "alpha", 0, docs=4)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, model={"attn_implementation": "flash_attention_2"},
                                                run={"mixed_precision": "bf16"}))
    result = cli("train", "--config", recipe)
    assert result.code == EXIT_USAGE, result.text
    assert "Traceback" not in result.text
    assert [line for line in result.text.splitlines() if line.startswith("error:")] == [
        line for line in result.text.splitlines() if "model.attn_implementation 'flash_attention_2' needs" in line]


def test_causal_attention_without_a_mask_changes_no_real_token(tmp_path: Path) -> None:
    model = tiny_llama(vocab=64)
    batch = collate([np.arange(2, 30) % 64, np.arange(5, 12) % 64], pad_id=0)
    before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert use_causal_attention_only(model) and model.config._attn_implementation == CAUSAL_SDPA
    after = model(input_ids=batch["input_ids"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(after[real], before[real], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path / "saved")  # the registered name never reaches config.json
    assert CAUSAL_SDPA not in (tmp_path / "saved" / "config.json").read_text()


def test_a_sliding_window_or_eager_model_keeps_its_masks() -> None:
    assert not use_causal_attention_only(tiny_llama(attn_implementation="eager"))
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=4, sliding_window=8))
    assert not use_causal_attention_only(mistral)
    assert mistral.config._attn_implementation == "sdpa"


# --------------------------------------------------------------------------- chunked loss


@pytest.mark.parametrize("section", [{"distill": {"method": "lwf"}},
                                     {"replay": {"policy": "reservoir", "store_logits_topk": 4}}])
def test_the_chunked_loss_refuses_parts_that_read_the_logits(tmp_path: Path, section: dict[str, Any]) -> None:
    with pytest.raises(RecipeError, match="run.loss_implementation 'chunked' never builds"):
        recipe_from_dict(tiny_recipe(tmp_path, run={"loss_implementation": "chunked"}, **section))


def train_losses(tmp_path: Path, name: str, **run: Any) -> list[float]:
    add_shard(tmp_path / "stream", "alpha", 0, docs=12)
    recipe = tiny_recipe(tmp_path, run={"max_steps": 4, **run},
                         replay={"policy": "priority", "ratio": 0.25, "capacity": 64})
    recipe["run"]["dir"] = str(tmp_path / name)
    assert run_increment(recipe_from_dict(recipe)).status == "increment_complete"
    return losses(tmp_path / name)


def test_a_chunked_run_trains_like_a_standard_one(tmp_path: Path) -> None:
    standard = train_losses(tmp_path, "standard")
    chunked = train_losses(tmp_path, "chunked", loss_implementation="chunked", loss_chunk_tokens=24)
    assert len(chunked) == len(standard) == 4
    np.testing.assert_allclose(chunked, standard, rtol=1e-4)


@pytest.mark.slow
def test_a_compiled_run_trains_like_an_eager_one(tmp_path: Path) -> None:
    """torch.compile on a CPU (inductor's C++ backend): a few steps, the same losses within float noise."""
    eager = train_losses(tmp_path, "eager")
    compiled = train_losses(tmp_path, "compiled", compile=True)
    assert len(compiled) == len(eager) == 4
    np.testing.assert_allclose(compiled, eager, rtol=1e-3)
