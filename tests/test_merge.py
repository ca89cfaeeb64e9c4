"""olm merge: identity on identical checkpoints, exact weighted averages, clear errors."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers
from conftest import add_shard, make_documents, tiny_llama, tiny_recipe, write_jsonl, write_recipe
from e2e_helpers import cli
from safetensors.torch import load_file

from olm_cli.errors import CheckpointError
from olm_cli.merge import merge_checkpoints, normalise_weights, vocabulary_hash


def checkpoint(path: Path, seed: int, hidden: int = 32) -> Path:
    tiny_llama(seed, hidden=hidden).save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128, "seed": seed}))
    return path


def test_normalise_weights() -> None:
    assert normalise_weights(None, 4) == [0.25] * 4
    assert normalise_weights([3, 1], 2) == [0.75, 0.25]
    assert normalise_weights([1200, 400, 400], 3) == [0.6, 0.2, 0.2]  # sample counts
    for bad in ([1], [-1, 2], [0, 0], [float("nan"), 1]):
        with pytest.raises(CheckpointError):
            normalise_weights(bad, 2)


def test_merge_of_identical_checkpoints_is_identity(tmp_path: Path) -> None:
    a = checkpoint(tmp_path / "a", 0)
    out = merge_checkpoints([a, a, a], [1, 2, 3], tmp_path / "out")
    src, dst = load_file(a / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(src) == set(dst)
    for k in src:
        torch.testing.assert_close(dst[k], src[k], rtol=1e-6, atol=1e-7)
        assert dst[k].dtype == src[k].dtype
    assert json.loads((out / "tokenizer_config.json").read_text())["seed"] == 0
    assert (out / "config.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(a)(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-6)


def test_weighted_merge_equals_hand_average(tmp_path: Path) -> None:
    a, b = checkpoint(tmp_path / "a", 0), checkpoint(tmp_path / "b", 1)
    out = merge_checkpoints([a, b], [3, 1], tmp_path / "out")
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    merged = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ta[name], tb[name])
    for k in ta:
        torch.testing.assert_close(merged[k], 0.75 * ta[k] + 0.25 * tb[k])
    meta = json.loads((out / "merge.json").read_text())
    assert meta["weights"] == [0.75, 0.25]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(dict(loaded.named_parameters())[name].detach(), merged[name])


def test_shape_mismatch_names_checkpoint_and_tensor(tmp_path: Path) -> None:
    a, b = checkpoint(tmp_path / "a", 0), checkpoint(tmp_path / "b", 1, hidden=48)
    with pytest.raises(CheckpointError, match=r"tensor '[^']+' has shape .* in .*b"):
        merge_checkpoints([a, b], None, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_names_checkpoint_and_tensor(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    a, b = checkpoint(tmp_path / "a", 0), checkpoint(tmp_path / "b", 1)
    tensors = load_file(b / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(b / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"b lacks tensor 'lm_head.weight'"):
        merge_checkpoints([a, b], None, tmp_path / "out")


def test_refuses_pickle_missing_dirs_and_non_empty_output(tmp_path: Path) -> None:
    a = checkpoint(tmp_path / "a", 0)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="safetensors only"):
        merge_checkpoints([a, pickled], None, tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a directory"):
        merge_checkpoints([a, tmp_path / "nope"], None, tmp_path / "out")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        merge_checkpoints([a], None, busy)
    with pytest.raises(CheckpointError, match="2 weights for 1"):
        merge_checkpoints([a], [1, 2], tmp_path / "out")


def test_sharded_checkpoint(tmp_path: Path) -> None:
    a = tmp_path / "a"
    tiny_llama(0).save_pretrained(a, max_shard_size="20KB")
    assert (a / "model.safetensors.index.json").is_file()
    b = checkpoint(tmp_path / "b", 1)
    out = merge_checkpoints([a, b], [1, 1], tmp_path / "out")
    merged = load_file(out / "model.safetensors")
    tb = load_file(b / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(a).state_dict()
    for k in tb:
        torch.testing.assert_close(merged[k], 0.5 * ref[k] + 0.5 * tb[k])


def test_merge_output_follows_the_umask_and_leaves_no_staging(tmp_path: Path) -> None:
    """The result used to keep mkdtemp's 0700 directory and safetensors' 0600 file, so a
    serving user in the group could not read a merged model."""
    a, b = checkpoint(tmp_path / "a", 0), checkpoint(tmp_path / "b", 1)
    old = os.umask(0o027)
    try:
        out = merge_checkpoints([a, b], None, tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o640}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]


def _with_tokenizer(path: Path, texts: list[str], vocab: int = 300) -> Path:
    from olm_cli.modeling import save_tokenizer, train_tokenizer

    shard = write_jsonl(path.parent / f"{path.name}-tok.jsonl", texts)
    save_tokenizer(train_tokenizer([shard], "text", vocab_size=vocab, limit_chars=50_000), path)
    return path


def test_architectures_must_agree_beyond_shapes(tmp_path: Path) -> None:
    """Same tensor shapes, different computation (rotary base): averaging would be meaningless."""
    a = checkpoint(tmp_path / "a", 0)
    b = tmp_path / "b"
    tiny_llama(1, rope_theta=500_000.0).save_pretrained(b)
    result = cli("merge", a, b, "--out", tmp_path / "out")
    assert result.code == 2 and result.has("have different architectures: config rope") , result.text
    assert not (tmp_path / "out").exists()


def test_tokenizers_must_agree(tmp_path: Path) -> None:
    a = _with_tokenizer(checkpoint(tmp_path / "a", 0), make_documents("alpha", 30, 0))
    b = _with_tokenizer(checkpoint(tmp_path / "b", 1), make_documents("beta", 30, 0))
    c = _with_tokenizer(checkpoint(tmp_path / "c", 2), make_documents("alpha", 30, 0))
    assert vocabulary_hash(a) == vocabulary_hash(c) != vocabulary_hash(b)
    result = cli("merge", a, b, "--out", tmp_path / "out")
    assert result.code == 2 and result.has("have different tokenizers (vocabulary hash"), result.text
    assert cli("merge", a, c, "--out", tmp_path / "ok").code == 0
    assert vocabulary_hash(tmp_path / "ok") == vocabulary_hash(a)


def test_weights_tokens_needs_runs(tmp_path: Path) -> None:
    a = checkpoint(tmp_path / "a", 0)
    result = cli("merge", a, a, "--weights", "tokens", "--out", tmp_path / "out")
    assert result.code == 2 and result.has("--weights tokens needs run directories")
    result = cli("merge", a, a, "--weights", "many", "--out", tmp_path / "out")
    assert result.code == 2 and result.has("expected 'tokens' or numbers")


@pytest.mark.slow
def test_federated_average_by_tokens(tmp_path: Path) -> None:
    """Two sites train one base on different amounts of their own data; FedAvg weights them n_k / n."""
    base = _with_tokenizer(tmp_path / "base", make_documents("alpha", 20, 9) + make_documents("beta", 20, 9))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    tiny_llama(0, vocab=len(tokenizer), eos_token_id=tokenizer.eos_token_id).save_pretrained(base)
    runs = {}
    for site, shards in (("a", 2), ("b", 1)):
        for index in range(shards):
            add_shard(tmp_path / f"data-{site}", "alpha" if site == "a" else "beta", index, docs=8)
        recipe = tiny_recipe(tmp_path)
        recipe["model"] = {"name_or_path": str(base)}
        recipe["data"]["shards"] = [str(tmp_path / f"data-{site}" / "*" / "*.jsonl")]
        recipe["run"]["dir"] = str(tmp_path / f"run-{site}")
        assert cli("train", "--config", write_recipe(tmp_path, recipe, f"{site}.yaml")).code == 0
        runs[site] = tmp_path / f"run-{site}"
    ledger_tokens = {site: json_tokens(run) for site, run in runs.items()}
    assert ledger_tokens["a"] > ledger_tokens["b"] > 0

    result = cli("merge", runs["a"], runs["b"], "--weights", "tokens", "--out", tmp_path / "merged", "--json")
    assert result.code == 0, result.text
    report = result.json()
    total = ledger_tokens["a"] + ledger_tokens["b"]
    assert [row["tokens"] for row in report["inputs"]] == [ledger_tokens["a"], ledger_tokens["b"]]
    assert report["weights"] == pytest.approx([ledger_tokens["a"] / total, ledger_tokens["b"] / total])
    releases = [(run / "releases" / "latest").resolve() for run in runs.values()]
    ta, tb = (load_file(r / "model.safetensors") for r in releases)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    wa, wb = report["weights"]
    for name in ta:
        torch.testing.assert_close(merged[name], (wa * ta[name].float() + wb * tb[name].float()).to(ta[name].dtype))
    assert json.loads((tmp_path / "merged" / "merge.json").read_text())["inputs"][0]["tokens"] == ledger_tokens["a"]
    human = cli("merge", runs["a"], runs["b"], "--weights", "tokens", "--out", tmp_path / "merged2")
    assert human.code == 0 and human.has(f"{ledger_tokens['a']:,}") and human.has(f"{wa:.4f}")

    # The release's checkpoint pruned: ledger.json still describes that increment, so it is used ...
    info = json.loads((releases[1] / "release.json").read_text())
    shutil.rmtree(runs["b"] / info["checkpoint"])
    assert cli("merge", runs["a"], runs["b"], "--weights", "tokens", "--out", tmp_path / "m3").code == 0
    # ... until a later increment has moved the ledger on: then the count is refused, not guessed
    ledger = json.loads((runs["b"] / "ledger.json").read_text())
    ledger["increment"] += 1
    (runs["b"] / "ledger.json").write_text(json.dumps(ledger))
    result = cli("merge", runs["a"], runs["b"], "--weights", "tokens", "--out", tmp_path / "m4")
    assert result.code == 1 and result.has("cannot tell how many tokens release-0001 was trained on")


def json_tokens(run: Path) -> int:
    return sum(int(s["tokens"]) for s in json.loads((run / "ledger.json").read_text())["shards"])
