"""The training loop's own behaviour: schedule, OOM back-off, selection and replay plumbing, matrix row 0."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import add_shard, tiny_recipe
from transformers import LlamaForCausalLM

from olm_cli.engine import lr_multiplier
from olm_cli.increment import run_increment
from olm_cli.recipe import recipe_from_dict


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_schedule_rewarms_then_decays_to_the_floor() -> None:
    kw = {"warmup": 10, "horizon": 110, "schedule": "cosine", "min_ratio": 0.1}
    assert lr_multiplier(0, **kw) == pytest.approx(0.1)
    assert lr_multiplier(9, **kw) == pytest.approx(1.0)
    assert lr_multiplier(10, **kw) == pytest.approx(1.0)
    assert lr_multiplier(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(110, **kw) == pytest.approx(0.1)
    assert lr_multiplier(50, warmup=0, horizon=100, schedule="constant", min_ratio=0.1) == 1.0
    assert lr_multiplier(100, warmup=0, horizon=100, schedule="linear", min_ratio=0.2) == pytest.approx(0.2)


def test_out_of_memory_backs_off_and_keeps_the_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    add_shard(tmp_path / "stream", "alpha", 0)
    original = LlamaForCausalLM.forward
    calls = {"oom": 0}

    def forward(self, input_ids=None, **kwargs):  # noqa: ANN001
        if self.training and input_ids is not None and input_ids.shape[0] > 2:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("simulated: micro-batch too large")
        return original(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, batch={"policy": "resource", "size": 4, "micro_batch": 4}, run={"max_steps": 4}))
    outcome = run_increment(recipe)
    assert outcome.steps == 4
    assert calls["oom"] >= 1
    rows = _metrics(tmp_path / "run")
    assert all(r["micro_batch"] == 2 and r["batch_size"] == 4 for r in rows)  # effective batch kept


def test_selector_stats_unselected_and_replay_mix_are_logged(tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0, docs=40)
    recipe = recipe_from_dict(tiny_recipe(
        tmp_path,
        selector={"name": "entropy", "pool_factor": 2, "weighting": True},
        replay={"policy": "priority", "capacity": 64, "ratio": 0.25},
        run={"max_steps": 6},
    ))
    run_increment(recipe)
    rows = _metrics(tmp_path / "run")
    assert [r["increment_step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["replayed"] == 0 and rows[-1]["replayed"] == 1  # round(0.25 * 4) once the buffer has data
    assert rows[-1]["unselected"] >= 6 * 3  # half of every pool of 6-8 candidates is left out
    assert "pool_mean_entropy" in rows[-1]


@pytest.mark.slow
def test_matrix_gets_row_zero_and_a_row_per_increment(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    eval_a = add_shard(tmp_path / "eval", "alpha", 9)
    eval_b = add_shard(tmp_path / "eval", "beta", 9)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, eval={"sets": {"alpha": str(eval_a), "beta": str(eval_b)}},
                                          run={"tensorboard": True}))
    add_shard(stream, "alpha", 0)
    run_increment(recipe)
    add_shard(stream, "beta", 0)
    run_increment(recipe)
    matrix = json.loads((tmp_path / "run" / "eval" / "matrix.json").read_text())
    assert matrix["row_labels"] == ["start", "inc 1", "inc 2"]
    assert matrix["trained_domain_per_row"] == [None, "alpha", "beta"]
    assert matrix["rows"][1][0] < matrix["rows"][0][0]  # training on alpha lowered alpha's loss
    assert list((tmp_path / "run").rglob("events.out.tfevents.*")), "tensorboard tracker wrote no events"


def test_small_replay_ratio_is_honoured_on_average(tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0, docs=60)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, replay={"policy": "reservoir", "capacity": 64, "ratio": 0.05},
                                          run={"max_steps": 40}))
    run_increment(recipe)
    rows = _metrics(tmp_path / "run")
    replayed = sum(r["replayed"] for r in rows)
    samples = sum(r["batch_size"] for r in rows)
    # round(0.05 * 4) would be 0 every step; stochastic rounding replays ~5% of all samples
    assert 0 < replayed < 0.15 * samples


def test_warm_started_buffer_carries_stored_logits(tmp_path: Path) -> None:
    old = add_shard(tmp_path / "old", "gamma", 0)
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = recipe_from_dict(tiny_recipe(
        tmp_path,
        replay={"policy": "reservoir", "capacity": 64, "ratio": 0.25, "seed_from": [str(old)], "seed_samples": 16},
        distill={"method": "stored_logits", "topk": 4},
        run={"max_steps": 3},
    ))
    run_increment(recipe)
    from olm_cli.replay.inspect import find_buffer_dir, inspect_replay

    report = inspect_replay(find_buffer_dir(tmp_path / "run"), as_json=False, console=None)
    assert report["stored_logits"] == report["size"] > 16  # seed blocks and trained blocks alike
    assert {d["name"] for d in report["by_domain"]} == {"gamma", "alpha"}


def test_missing_eval_file_fails_before_training(tmp_path: Path) -> None:
    from olm_cli.errors import RecipeError

    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = recipe_from_dict(tiny_recipe(tmp_path, eval={"sets": {"alpha": str(tmp_path / "missing.jsonl")}}))
    with pytest.raises(RecipeError, match=r"eval\.sets\.alpha: .*missing\.jsonl: no such file"):
        run_increment(recipe)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
