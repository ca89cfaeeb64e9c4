"""``replay.seed_from: generate``: the starting model's samples warm-start the buffer, resumably."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import tiny_llama, tiny_recipe, write_recipe
from e2e_helpers import add_shard, cli

from olm_cli.errors import RecipeError
from olm_cli.recipe import load_recipe
from olm_cli.replay.config import GenerateConfig
from olm_cli.replay.seed_generate import SEED_DIR, generate_seed_blocks


class CharTokenizer:
    """Enough of a tokenizer for generation: a prompt's characters as ids, BOS 1, EOS 2, pad 0."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [1] + [3 + ord(c) % 60 for c in text]}


class _Stop:
    """A GracefulStop whose ``requested`` answers from ``answers`` (a stop before a chosen batch)."""

    signal = 15

    def __init__(self, answers: Any) -> None:
        self.answers = answers

    @property
    def requested(self) -> bool:
        return bool(next(self.answers))

    def request(self, signum: int) -> None:
        raise AssertionError("a single process never adopts another rank's signal")


def _generate(tmp_path: Path, config: GenerateConfig, stop: Any = None,
              model: torch.nn.Module | None = None) -> tuple[list[Any], Any]:
    model = model if model is not None else tiny_llama(seed=0)
    return generate_seed_blocks(model, CharTokenizer(), config, run_dir=tmp_path, seed=7, block_size=12,
                                device="cpu", say=lambda _: None, stop=stop)


def _tokens(blocks: list[Any]) -> list[list[int]]:
    return [b.tokens.tolist() for b in blocks]


def test_generation_is_batched_prompted_and_cut_to_the_block_size(tmp_path: Path) -> None:
    config = GenerateConfig(samples=5, batch_size=2, max_new_tokens=16, prompts=["ab", "xyz"])
    blocks, cost = _generate(tmp_path, config)
    assert cost is not None and (cost.samples, cost.batches, cost.resumed_batches) == (5, 3, 0)
    assert len(blocks) == 5 and all(1 <= len(b) <= 12 for b in blocks)
    assert {b.domain for b in blocks} == {"generated"}
    # Batches use the prompts in turn: batch 0 starts "ab", batch 1 "xyz", batch 2 "ab" again.
    starts = [b.tokens[:3].tolist() for b in blocks]
    assert starts[0][:3] == starts[1][:3] == [1, 3 + ord("a") % 60, 3 + ord("b") % 60]
    assert starts[2] == starts[3] == [1, 3 + ord("x") % 60, 3 + ord("y") % 60]
    assert cost.generated_tokens > 0 and cost.seconds > 0
    recorded = json.loads((tmp_path / SEED_DIR / "generation.json").read_text())
    assert recorded["samples"] == 5 and recorded["generated_tokens"] == cost.generated_tokens


def test_an_interrupted_generation_continues_to_the_same_samples(tmp_path: Path) -> None:
    config = GenerateConfig(samples=6, batch_size=2, max_new_tokens=10)
    reference, _ = _generate(tmp_path / "reference", config)
    stop = _Stop(iter([False, True]))  # stopped before the second batch
    stopped_blocks, stopped_cost = _generate(tmp_path / "killed", config, stop=stop)
    assert (stopped_blocks, stopped_cost) == ([], None)
    assert len(list((tmp_path / "killed" / SEED_DIR).glob("batch-*.npz"))) == 1
    torch.manual_seed(123)  # whatever the global generator holds, batch b is sampled from run.seed + b
    resumed, cost = _generate(tmp_path / "killed", config)
    assert cost is not None and cost.resumed_batches == 1
    assert _tokens(resumed) == _tokens(reference)


def test_changed_settings_generate_again(tmp_path: Path) -> None:
    first, _ = _generate(tmp_path, GenerateConfig(samples=2, batch_size=2, max_new_tokens=6))
    second, cost = _generate(tmp_path, GenerateConfig(samples=2, batch_size=2, max_new_tokens=3))
    assert cost is not None and cost.resumed_batches == 0
    assert [len(b) for b in first] == [7, 7] and [len(b) for b in second] == [4, 4]


def test_generation_leaves_the_run_random_stream_alone(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    torch.manual_seed(5)
    _generate(tmp_path, GenerateConfig(samples=2, batch_size=2, max_new_tokens=4), model=model)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))


def test_generate_settings_need_seed_from_generate(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, replay={"policy": "fifo", "generate": {"samples": 4}}))
    with pytest.raises(RecipeError, match="replay.generate applies with replay.seed_from: generate"):
        load_recipe(path)
    ok = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, replay={
        "policy": "fifo", "seed_from": "generate", "generate": {"samples": 4, "prompts": ["x"]}}), name="ok.yaml"))
    assert ok.replay.seed_from == "generate" and ok.replay.generate.prompts == ["x"]


@pytest.mark.slow
def test_train_seeds_the_buffer_with_generated_samples(tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0, docs=8)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, replay={
        "policy": "fifo", "ratio": 0.5, "capacity": 32, "seed_from": "generate",
        "generate": {"samples": 6, "batch_size": 4, "max_new_tokens": 8}}))
    result = cli("train", "--config", recipe)
    assert result.code == 0, result.text
    assert result.has("generated 6 replay seed sample(s)"), result.text
    assert result.has("replay buffer warm-started with 6 blocks"), result.text
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["replayed"] == 2  # half of the first batch already comes from the generated samples
    with np.load(tmp_path / "run" / SEED_DIR / "batch-00001.npz", allow_pickle=False) as saved:
        assert len(saved["lengths"]) == 2
