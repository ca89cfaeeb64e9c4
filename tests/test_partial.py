"""Partial updates and LoRA: frozen weights stay put, adapters merge into a plain model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from conftest import tiny_llama
from peft import PeftModel

from olm_cli.errors import RecipeError
from olm_cli.partial import (
    LoraConfig,
    PartialUpdates,
    TrainConfig,
    apply_trainable,
    is_full_update,
    model_for_save,
    wrap_lora,
)
from olm_cli.samples import collate
from olm_cli.state_files import load_tree, save_tree


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


LORA = TrainConfig(trainable=["lm_head.*"], lora=LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    b = batch()
    model.eval()
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def _checkpoint(part: PartialUpdates, model: torch.nn.Module, directory: Path) -> None:
    """What the engine writes: the merged model and the part's state through save_tree."""
    part.for_save(model).save_pretrained(directory)
    save_tree(directory / "parts", {"partial": part.state_dict()})


def test_resumed_lora_increment_continues_with_its_adapters_bit_for_bit(tmp_path: Path) -> None:
    part = PartialUpdates(LORA)
    model = part.prepare(tiny_llama(), increment=2)
    train_step(model, lr=0.1)
    train_step(model, lr=0.1)
    _checkpoint(part, model, tmp_path)

    resumed_part = PartialUpdates(LORA)
    resumed = resumed_part.prepare(transformers.AutoModelForCausalLM.from_pretrained(tmp_path), increment=2)
    resumed_part.load_state_dict(load_tree(tmp_path / "parts")["partial"])
    trained = dict(model.named_parameters())
    for name, param in resumed.named_parameters():
        assert torch.equal(param, trained[name]), name  # adapters and un-merged base weights alike
    assert resumed_part.trainable == part.trainable
    torch.testing.assert_close(_logits(resumed), _logits(model), rtol=0, atol=0)


def test_a_new_increment_starts_fresh_adapters_on_the_merged_weights(tmp_path: Path) -> None:
    part = PartialUpdates(LORA)
    model = part.prepare(tiny_llama(), increment=1)
    train_step(model, lr=0.1)
    train_step(model, lr=0.1)
    _checkpoint(part, model, tmp_path)

    next_part = PartialUpdates(LORA)
    following = next_part.prepare(transformers.AutoModelForCausalLM.from_pretrained(tmp_path), increment=2)
    next_part.load_state_dict(load_tree(tmp_path / "parts")["partial"])
    lora_b = [p for n, p in following.named_parameters() if "lora_B" in n]
    assert lora_b and all(not p.any() for p in lora_b)  # fresh adapters: B starts at zero
    torch.testing.assert_close(_logits(following), _logits(model), rtol=1e-4, atol=1e-5)


def test_adapters_that_no_longer_fit_are_left_fresh_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    part = PartialUpdates(LORA)
    model = part.prepare(tiny_llama(), increment=1)
    train_step(model, lr=0.1)
    state = part.state_dict()

    narrower = PartialUpdates(TrainConfig(lora=LoraConfig(r=2, target_modules=["q_proj", "v_proj"])))
    other = narrower.prepare(tiny_llama(), increment=1)
    before = {n: p.detach().clone() for n, p in other.named_parameters()}
    narrower.load_state_dict(state)
    assert all(torch.equal(p, before[n]) for n, p in other.named_parameters())
    assert "LoRA adapters not restored" in caplog.text


def test_without_lora_the_part_keeps_no_state() -> None:
    part = PartialUpdates(TrainConfig(trainable=["lm_head.*"]))
    model = part.prepare(tiny_llama(), increment=1)
    assert part.trainable == ["lm_head.weight"]
    assert part.state_dict() == {}
    assert part.for_save(model) is model
    part.load_state_dict({})  # an older checkpoint without the entry
