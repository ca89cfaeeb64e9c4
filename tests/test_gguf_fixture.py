"""The tiny GGUF fixture loads through transformers' GGUF path with exactly the reference logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("gguf")

from gguf_fixture import write_tiny_llama_gguf  # noqa: E402  (tests/ is on sys.path: no __init__.py)
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

INPUT_IDS = torch.tensor([[266, 3, 70, 257, 258, 100, 200, 265, 12, 99, 1, 264]])


def _reference_logits(info: dict[str, Any]) -> torch.Tensor:
    reference = LlamaForCausalLM(info["config"]).eval()
    reference.load_state_dict(info["state_dict"])
    with torch.no_grad():
        return reference(INPUT_IDS).logits


def _gguf_logits(directory: Path, gguf_file: str) -> tuple[torch.Tensor, Any]:
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file).eval()
    with torch.no_grad():
        return model(INPUT_IDS).logits, model


@pytest.fixture(scope="module")
def untied(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("gguf")
    return directory, write_tiny_llama_gguf(directory / "tiny.gguf")


def test_model_loads_with_reference_logits(untied: tuple[Path, dict[str, Any]]) -> None:
    directory, info = untied
    logits, model = _gguf_logits(directory, info["gguf_file"])
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.num_key_value_heads == 2 and model.config.vocab_size == 267
    assert not model.config.tie_word_embeddings
    assert logits.abs().mean() > 0.1  # weights matter, so a mis-loaded tensor would show
    torch.testing.assert_close(logits, _reference_logits(info), rtol=0, atol=1e-5)


def test_tied_embeddings_omit_output_tensor(tmp_path: Path) -> None:
    info = write_tiny_llama_gguf(tmp_path / "tied.gguf", tie_word_embeddings=True, seed=1)
    logits, model = _gguf_logits(tmp_path, "tied.gguf")
    assert model.config.tie_word_embeddings
    torch.testing.assert_close(logits, _reference_logits(info), rtol=0, atol=1e-5)


def test_unpermuted_qk_is_detected(tmp_path: Path) -> None:
    """Guards the test above: writing q/k without llama.cpp's permutation must change the logits."""
    info = write_tiny_llama_gguf(tmp_path / "raw.gguf", permute_qk=False)
    logits, _ = _gguf_logits(tmp_path, "raw.gguf")
    assert (logits - _reference_logits(info)).abs().max() > 1e-2


def test_tokenizer_loads_from_gguf(untied: tuple[Path, dict[str, Any]]) -> None:
    directory, info = untied
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=info["gguf_file"])
    assert len(tokenizer) == len(info["tokens"])
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == info["eos_token_id"]
    text = "hello the world, there"
    ids = tokenizer(text).input_ids
    assert "\u0120the" in tokenizer.convert_ids_to_tokens(ids)  # merges are applied
    assert tokenizer.decode(ids) == text
    assert tokenizer("a<|endoftext|>").input_ids[-1] == info["eos_token_id"]  # kept whole
    assert max(tokenizer("héllo ✓").input_ids) < len(info["tokens"])  # byte fallback


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    write_tiny_llama_gguf(tmp_path / "a.gguf")
    write_tiny_llama_gguf(tmp_path / "b.gguf")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_gguf_model_saves_as_safetensors_once_quantizer_is_dropped(
    untied: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """transformers attaches a GGUF "quantizer" even to float32 files, and `save_pretrained` then
    refuses. Dropping it is safe here because the weights are plain dense tensors."""
    directory, info = untied
    logits, model = _gguf_logits(directory, info["gguf_file"])
    model.hf_quantizer = None
    del model.config.quantization_config
    model.save_pretrained(tmp_path / "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(INPUT_IDS).logits, logits, rtol=0, atol=0)
