"""Partial updates and LoRA: frozen weights stay put, adapters merge into a plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_llama
from peft import PeftModel

from olm_cli.distill import LoraConfig, TrainConfig
from olm_cli.errors import RecipeError
from olm_cli.partial import apply_trainable, is_full_update, model_for_save, wrap_lora
from olm_cli.samples import collate


def batch() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return collate([rng.integers(0, 64, size=n).astype(np.int32) for n in (8, 6)], pad_id=0)


def train_step(model: torch.nn.Module, lr: float = 0.05) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)
    b = batch()
    model(**b).loss.backward()
    optim.step()


PATTERNS = ["model.embed_tokens.*", "model.layers.0.*", "lm_head.*"]


def test_frozen_modules_unchanged_after_a_step() -> None:
    model = tiny_llama()
    names = apply_trainable(model, TrainConfig(trainable=PATTERNS), increment=1)
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert all(n.startswith(("model.embed_tokens", "model.layers.0.", "lm_head")) for n in names)
    assert not any(n.startswith("model.layers.1.") for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model)
    for n, p in model.named_parameters():
        changed = not torch.equal(p, before[n])
        assert changed == (n in names), n


def test_glob_does_not_overmatch_and_regex_prefix() -> None:
    model = tiny_llama()
    names = apply_trainable(model, TrainConfig(trainable=["model.layers.1.*"]), increment=1)
    assert names and all(n.startswith("model.layers.1.") for n in names)
    names = apply_trainable(
        model, TrainConfig(trainable=[r"re:model\.layers\.\d+\.mlp\..*"]), increment=1
    )
    assert names and all(".mlp." in n for n in names)
    assert len(names) == 2 * 3


def test_pattern_matching_nothing_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="model.layer.0"):
        apply_trainable(tiny_llama(), TrainConfig(trainable=["model.layer.0.*"]), increment=1)


def test_empty_trainable_means_everything() -> None:
    model = tiny_llama()
    names = apply_trainable(model, TrainConfig(), increment=1)
    assert names == [n for n, _ in model.named_parameters()]


def test_full_update_every() -> None:
    cfg = TrainConfig(trainable=["lm_head.*"], full_update_every=2)
    assert [is_full_update(cfg, i) for i in range(1, 6)] == [False, True, False, True, False]
    model = tiny_llama()
    total = len(list(model.parameters()))
    assert apply_trainable(model, cfg, increment=1) == ["lm_head.weight"]
    assert len(apply_trainable(model, cfg, increment=2)) == total
    assert all(p.requires_grad for p in model.parameters())
    assert apply_trainable(model, cfg, increment=3) == ["lm_head.weight"]
    assert not is_full_update(TrainConfig(full_update_every=0), 4)


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(tmp_path: Path) -> None:
    model = tiny_llama()
    base_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    wrapped = wrap_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    trainable = apply_trainable(wrapped, TrainConfig(), increment=1)
    assert trainable and all("lora_" in n for n in trainable)
    train_step(wrapped, lr=0.1)
    train_step(wrapped, lr=0.1)  # two steps: lora_B leaves zero, so the adapters matter

    for name, p in wrapped.named_parameters():
        if "lora_" not in name:
            plain = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(p, base_before[plain]), name

    b = batch()
    wrapped.eval()
    with torch.no_grad():
        wrapped_out = wrapped(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        base_out = tiny_llama()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert not torch.allclose(wrapped_out, base_out, atol=1e-5)  # adapters changed something

    merged = model_for_save(wrapped)
    assert not isinstance(merged, PeftModel)
    assert isinstance(merged, transformers.LlamaForCausalLM)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_out = merged(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(merged_out, wrapped_out, rtol=1e-4, atol=1e-5)
    # The training model keeps its separate adapters and its outputs.
    assert isinstance(wrapped, PeftModel)
    assert any("lora_" in n for n, _ in wrapped.named_parameters())
    with torch.no_grad():
        again = wrapped(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(again, wrapped_out)

    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        re_out = reloaded(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    torch.testing.assert_close(re_out, wrapped_out, rtol=1e-4, atol=1e-5)


def test_lora_with_patterns_unfreezes_base_weights_too() -> None:
    wrapped = wrap_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    names = apply_trainable(wrapped, TrainConfig(trainable=["lm_head.*"]), increment=1)
    assert any("lora_" in n for n in names)
    assert [n for n in names if "lora_" not in n] == ["base_model.model.lm_head.weight"]


def test_model_for_save_without_lora_is_identity() -> None:
    model = tiny_llama()
    assert model_for_save(model) is model


def test_bad_lora_target_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="nonexistent_proj"):
        wrap_lora(tiny_llama(), LoraConfig(target_modules=["nonexistent_proj"]))
