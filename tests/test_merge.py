"""olm merge: identity on identical checkpoints, exact weighted averages, clear errors."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_llama
from safetensors.torch import load_file

from olm_cli.errors import CheckpointError
from olm_cli.merge import merge_checkpoints, normalise_weights


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
