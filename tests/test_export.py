"""olm export: GGUF that transformers loads back with the same logits, safetensors in a dtype, pruning, refusals."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_shard, make_documents, tiny_recipe, write_jsonl, write_recipe
from e2e_helpers import cli
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from olm_cli.export.pruning import Pruner, is_prunable, magnitude_prune
from olm_cli.modeling import _load_hf_model, load_tokenizer, save_tokenizer, train_tokenizer

pytest.importorskip("gguf")

from gguf_fixture import write_tiny_llama_gguf  # noqa: E402  (tests/ is on sys.path)

INPUT_IDS = torch.tensor([[266, 3, 70, 257, 258, 100, 200, 265, 12, 99, 1, 264, 40, 41, 42, 260]])
# Measured on the fixture models (logit std ~1 untied, ~8.5 tied): f16 stays below 0.003 std,
# q8_0 below 0.06 std. The bounds leave headroom without hiding a wrong tensor (which moves
# the logits by whole standard deviations, see test_unpermuted_qk_is_caught).
TOLERANCE = {"f32": 0.0, "f16": 0.01, "q8_0": 0.1}


def hf_from_gguf(directory: Path, *, seed: int = 0, tied: bool = False) -> Path:
    """The fixture GGUF as olm keeps it after de-quantising: a plain HF directory with tokenizer.json."""
    write_tiny_llama_gguf(directory / "src.gguf", seed=seed, tie_word_embeddings=tied)
    model = _load_hf_model(str(directory), "float32", "src.gguf", None, False)
    model.save_pretrained(directory / "hf")
    save_tokenizer(load_tokenizer(str(directory), gguf_file="src.gguf"), directory / "hf")
    return directory / "hf"


def logits(model: Any, ids: torch.Tensor = INPUT_IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_gguf(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def fixture_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hf_from_gguf(tmp_path_factory.mktemp("export"))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("quantize", ["f32", "f16", "q8_0"])
def test_gguf_loads_back_with_the_same_logits(tmp_path: Path, quantize: str, tied: bool) -> None:
    source = hf_from_gguf(tmp_path, seed=3, tied=tied)
    out = tmp_path / f"model-{quantize}.gguf"
    result = cli("export", "--checkpoint", source, "--quantize", quantize, "--out", out, "--json")
    assert result.code == 0, result.text
    report = result.json()
    reference = AutoModelForCausalLM.from_pretrained(source).eval()
    exported = load_gguf(out)
    assert exported.config.tie_word_embeddings == tied
    expected, got = logits(reference), logits(exported)
    error = float((got - expected).abs().max())
    if quantize == "f32":
        assert error == 0.0  # bit-exact: same float32 weights, q/k permuted and un-permuted
    else:
        assert 0.0 < error <= TOLERANCE[quantize] * float(expected.std()), error
        assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    count = 20 if tied else 21  # a tied head is written once
    assert report["tensors"] == count
    if quantize == "f32":
        assert report["tensor_types"] == {"F32": count}
    else:  # the norm gains (2 per layer, and the final one) stay float32
        assert report["tensor_types"] == {"F32": 5, quantize.upper(): count - 5}


def test_sizes_shrink_with_the_type(tmp_path: Path, fixture_hf: Path) -> None:
    sizes = {}
    for quantize in ("f32", "f16", "q8_0"):
        out = tmp_path / f"{quantize}.gguf"
        assert cli("export", "--checkpoint", fixture_hf, "--quantize", quantize, "--out", out).code == 0
        sizes[quantize] = out.stat().st_size
    assert sizes["f16"] < 0.55 * sizes["f32"]
    assert sizes["q8_0"] < 0.32 * sizes["f32"]  # 34 bytes per 32 weights, plus tokenizer metadata


def test_unpermuted_qk_is_caught(tmp_path: Path, fixture_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Guards the exactness test: writing q/k rows without llama.cpp's permutation must show."""
    from olm_cli.export import llama_gguf

    monkeypatch.setattr(llama_gguf, "permute_for_rope", lambda weight, heads: weight)
    out = tmp_path / "raw.gguf"
    assert cli("export", "--checkpoint", fixture_hf, "--quantize", "f32", "--out", out).code == 0
    reference = AutoModelForCausalLM.from_pretrained(fixture_hf).eval()
    assert float((logits(load_gguf(out)) - logits(reference)).abs().max()) > 0.1


def test_tokenizer_round_trips(tmp_path: Path, fixture_hf: Path) -> None:
    out = tmp_path / "tok.gguf"
    result = cli("export", "--checkpoint", fixture_hf, "--quantize", "f16", "--out", out, "--check", "--json")
    assert result.code == 0, result.text
    assert result.json()["check"]["tokenizer_matches"] is True
    original = AutoTokenizer.from_pretrained(fixture_hf)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in ("hello the world, there", "héllo ✓ 123\n\tend<|endoftext|>", "  two  spaces"):
        assert loaded(text).input_ids == original(text).input_ids
    assert loaded.eos_token == "<|endoftext|>"


def test_scratch_tokenizer_with_two_special_tokens(tmp_path: Path) -> None:
    """olm's own from-scratch tokenizer (<|endoftext|>, <|pad|>, no BOS) survives the GGUF trip."""
    shard = add_shard(tmp_path / "stream", "beta", 0)
    tokenizer = train_tokenizer([shard], "text", vocab_size=300, limit_chars=50_000)
    config = LlamaConfig(vocab_size=len(tokenizer) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    save_tokenizer(tokenizer, tmp_path / "base")
    out = tmp_path / "scratch.gguf"
    result = cli("export", "--checkpoint", tmp_path / "base", "--quantize", "f32", "--out", out, "--check", "--json")
    assert result.code == 0, result.text
    check = result.json()["check"]
    assert check["tokenizer_matches"] and check["max_abs_logit_diff"] == 0.0
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "def value(self): return lambda x<|pad|>yield<|endoftext|>"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.eos_token_id == tokenizer.eos_token_id and loaded.pad_token_id == tokenizer.pad_token_id
    assert result.json()["vocab"] == len(tokenizer) + 4  # the embedding's spare rows become unused tokens
    assert result.json()["tokenizer_pre"] == "gpt-2"  # llama.cpp's name for GPT-2's split regex


def test_llama3_style_tokenizer_with_bos(tmp_path: Path) -> None:
    """Llama 3's split regex is written as llama.cpp's 'llama-bpe', and a BOS its post-processor adds is kept."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from olm_cli.export.llama_gguf import LLAMA3_SPLIT

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(make_documents("gamma", 40, 0), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    save_tokenizer(tokenizer, tmp_path / "base")
    out = tmp_path / "llama3.gguf"
    result = cli("export", "--checkpoint", tmp_path / "base", "--quantize", "f32", "--out", out, "--check", "--json")
    assert result.code == 0, result.text
    assert result.json()["tokenizer_pre"] == "llama-bpe"
    assert result.json()["check"]["tokenizer_matches"] and result.json()["check"]["max_abs_logit_diff"] == 0.0
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    text = "The knight's 123456 banners!!  sieges\n\nof honour"
    ids = loaded(text).input_ids
    assert ids[0] == 0 and ids == tokenizer(text).input_ids


def test_safetensors_in_bfloat16_is_half_size_and_loads(tmp_path: Path, fixture_hf: Path) -> None:
    out = tmp_path / "bf16"
    old = os.umask(0o027)
    try:
        result = cli("export", "--checkpoint", fixture_hf, "--format", "safetensors", "--dtype", "bfloat16",
                     "--out", out, "--json")
    finally:
        os.umask(old)
    assert result.code == 0, result.text
    assert result.json()["bytes"] < 0.55 * result.json()["source_bytes"] + 100_000  # tokenizer files besides
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert (out / "model.safetensors").stat().st_size < 0.51 * (fixture_hf / "model.safetensors").stat().st_size
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(fixture_hf).eval()
    expected = logits(reference)
    assert float((logits(model) - expected).abs().max()) < 0.05 * float(expected.std())
    assert AutoTokenizer.from_pretrained(out)("hello there").input_ids == \
        AutoTokenizer.from_pretrained(fixture_hf)("hello there").input_ids
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}
    again = cli("export", "--checkpoint", fixture_hf, "--format", "safetensors", "--out", out)
    assert again.code == 2 and again.has("already exists; pass --force")
    assert cli("export", "--checkpoint", fixture_hf, "--format", "safetensors", "--out", out, "--force").code == 0
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}  # auto: as stored
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep")
    refused = cli("export", "--checkpoint", fixture_hf, "--format", "safetensors", "--out", user_dir, "--force")
    assert refused.code == 2 and refused.has("did not write") and (user_dir / "notes.txt").read_text() == "keep"


def test_magnitude_prune_zeroes_exactly_the_smallest() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 20)
    pruned = magnitude_prune(weight, 0.3, "unstructured")
    zeroed = pruned == 0
    assert int(zeroed.sum()) == 48  # round(0.3 * 160)
    assert float(weight[zeroed].abs().max()) <= float(weight[~zeroed].abs().min())
    torch.testing.assert_close(pruned[~zeroed], weight[~zeroed], rtol=0, atol=0)
    rows = magnitude_prune(weight, 0.3, "row")
    assert (rows == 0).sum(dim=1).tolist() == [6] * 8  # round(0.3 * 20) in every row
    for row, original in zip(rows, weight, strict=True):
        assert float(original[row == 0].abs().max()) <= float(original[row != 0].abs().min())
    assert torch.equal(magnitude_prune(weight, 0.3, "row"), rows)  # deterministic
    assert torch.equal(magnitude_prune(weight, 0.0, "row"), weight)
    with pytest.raises(ValueError):
        magnitude_prune(weight, 1.0, "row")


def test_only_block_matrices_are_prunable() -> None:
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    names = {name for name, p in model.named_parameters() if is_prunable(name, p)}
    assert names == {f"model.layers.0.{part}.weight" for part in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    pruner = Pruner(0.5, "unstructured")
    pruner.prune_model(model)
    assert pruner.report.to_dict()["sparsity_of_pruned_tensors"] == pytest.approx(0.5, abs=0.01)
    assert not bool((model.model.embed_tokens.weight == 0).any())


@pytest.mark.parametrize("scope", ["unstructured", "row"])
def test_prune_reports_its_loss_cost_and_exports_the_pruned_weights(tmp_path: Path, fixture_hf: Path,
                                                                   scope: str) -> None:
    eval_file = write_jsonl(tmp_path / "held.jsonl", ["the river runs past the old mill", "hello there world"] * 4)
    out = tmp_path / "pruned.gguf"
    result = cli("export", "--checkpoint", fixture_hf, "--quantize", "f32", "--prune", "0.3", "--prune-scope", scope,
                 "--eval-text", eval_file, "--check", "--out", out, "--json")
    assert result.code == 0, result.text
    report = result.json()
    prune = report["prune"]
    assert prune["scope"] == scope and prune["tensors"] == 14
    assert prune["sparsity_of_pruned_tensors"] == pytest.approx(0.3, abs=0.01)
    before, after = prune["loss_before"]["held"], prune["loss_after"]["held"]
    assert after != before and prune["loss_delta"]["held"] == pytest.approx(after - before)
    # the file holds exactly the weights whose loss was measured
    assert report["check"]["max_abs_logit_diff"] == 0.0
    assert report["check"]["loss"]["held"] == pytest.approx(after, abs=1e-5)
    q_proj = load_gguf(out).state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert float((q_proj == 0).float().mean()) == pytest.approx(0.3, abs=0.01)
    human = cli("export", "--checkpoint", fixture_hf, "--prune", "0.3", "--eval-text", eval_file,
                "--out", tmp_path / "again.gguf")
    assert human.code == 0 and human.has("held-out loss") and human.has("Δ pruning")


def test_refusals_are_one_line_with_exit_2(tmp_path: Path, fixture_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    save_tokenizer(load_tokenizer(str(fixture_hf)), tmp_path / "gpt2")
    result = cli("export", "--checkpoint", tmp_path / "gpt2", "--out", tmp_path / "x.gguf")
    assert result.code == 2 and result.has("model_type 'gpt2' cannot be exported to GGUF")

    existing = tmp_path / "taken.gguf"
    existing.write_text("mine")
    result = cli("export", "--checkpoint", fixture_hf, "--out", existing)
    assert result.code == 2 and result.has("already exists; pass --force")
    assert existing.read_text() == "mine"
    assert cli("export", "--checkpoint", fixture_hf, "--out", existing, "--force").code == 0
    assert existing.stat().st_size > 100_000

    result = cli("export", "--checkpoint", fixture_hf, "--out", tmp_path / "gpt2")
    assert result.code == 2 and result.has("is a directory; a GGUF export is one file")
    result = cli("export", "--checkpoint", fixture_hf, "--prune", "0.3", "--out", tmp_path / "p.gguf")
    assert result.code == 2 and result.has("pass --eval-text FILE")
    result = cli("export", "--checkpoint", fixture_hf, "--run", tmp_path, "--out", tmp_path / "p.gguf")
    assert result.code == 2 and result.has("exactly one of --run DIR or --checkpoint DIR")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("model: {}\n")
    result = cli("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "p.gguf")
    assert result.code == 2 and result.has("is a run directory; use --run")
    result = cli("export", "--checkpoint", fixture_hf, "--quantize", "q4_k", "--out", tmp_path / "p.gguf")
    assert result.code == 2 and result.has("expected one of f32, f16, q8_0")

    import builtins

    real_import = builtins.__import__

    def no_gguf(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "gguf":
            raise ImportError("No module named 'gguf'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_gguf)
    result = cli("export", "--checkpoint", fixture_hf, "--out", tmp_path / "n.gguf")
    assert result.code == 2 and result.has("pip install 'olm[gguf]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "run", "taken.gguf"]  # nothing half-written


def test_gguf_file_follows_the_umask(tmp_path: Path, fixture_hf: Path) -> None:
    old = os.umask(0o027)
    try:
        assert cli("export", "--checkpoint", fixture_hf, "--out", tmp_path / "m.gguf").code == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.gguf").stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


@pytest.mark.slow
def test_round_trip_gguf_train_gguf(tmp_path: Path) -> None:
    """GGUF -> olm train (init from the GGUF) -> olm export -> transformers loads it with the release's logits."""
    info = write_tiny_llama_gguf(tmp_path / "gguf" / "tiny.gguf", seed=5)
    add_shard(tmp_path / "stream", "alpha", 0)
    eval_file = write_jsonl(tmp_path / "eval" / "alpha.jsonl", ["the river runs past the old mill and the miller"] * 6)
    recipe = tiny_recipe(tmp_path, eval={"sets": {"alpha": str(eval_file)}})
    recipe["model"] = {"name_or_path": str(tmp_path / "gguf"), "gguf_file": info["gguf_file"]}
    recipe["run"]["max_steps"] = 4
    config = write_recipe(tmp_path, recipe)
    assert cli("train", "--config", config).code == 0
    run = tmp_path / "run"
    release = (run / "releases" / "latest").resolve()
    out = tmp_path / "trained.gguf"
    result = cli("export", "--run", run, "--quantize", "f32", "--out", out, "--check", "--json")
    assert result.code == 0, result.text
    report = result.json()
    assert Path(report["source"]).resolve() == release
    assert report["check"]["max_abs_logit_diff"] == 0.0 and report["check"]["tokenizer_matches"]
    trained = AutoModelForCausalLM.from_pretrained(release).eval()
    exported = load_gguf(out)
    assert torch.equal(logits(exported), logits(trained))
    # training moved the weights: the exported file is the trained model, not the original GGUF
    original = LlamaForCausalLM(info["config"]).eval()
    original.load_state_dict(info["state_dict"])
    assert float((logits(exported) - logits(original)).abs().max()) > 1e-3
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert tokenizer("the miller").input_ids == AutoTokenizer.from_pretrained(release)("the miller").input_ids
    assert report["check"]["loss"]["alpha"] == pytest.approx(report["check"]["reference_loss"]["alpha"], abs=1e-5)
