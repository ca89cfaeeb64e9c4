"""Two processes on CPU (torchrun + gloo): the strategy parts that keep copies of the weights.

EWC, Reptile, a WSD cooldown branch and generated replay seeds under DDP and FSDP2 train what
one process trains: final weights compared within test_distributed.py's bound (1e-5 absolute +
1e-4 relative), never losses. A run killed after its trunk finished, mid-cooldown, finishes its
release on the next invocation with bit-identical weights (DDP and FSDP), every rank taking part.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import assert_bit_identical, latest, weights
from test_distributed import CLOSE, _env, _kill_tree, _olm, _train, pytestmark  # noqa: F401 (same marks)

from olm_cli.replay.seed_generate import SEED_DIR
from olm_cli.rundir import CheckpointManager
from olm_cli.state_files import load_tree

WSD = {
    "optim": {"schedule": "wsd", "lr": 1e-3, "warmup_steps": 2, "cooldown_fraction": 1.0},
    "replay": {"policy": "reservoir", "capacity": 50, "ratio": 0.25, "seed_from": "generate",
               "generate": {"samples": 6, "batch_size": 2, "max_new_tokens": 8}},
    "run": {"checkpoint_every": 3, "async_checkpoint": False},
}
DOCS = 48  # about 34 trunk steps and as many cooldown steps: a kill lands well inside the cooldown
ANCHORED = {
    # A strong pull, so a penalty gradient off by a factor (or missing on a shard) shows in the weights.
    "regularize": {"method": "ewc", "strength": 1000.0, "fisher_batches": 2},
    "optim": {"lr": 1e-3, "warmup_steps": 2, "meta": {"method": "reptile", "inner_steps": 3, "outer_lr": 0.5}},
    "replay": {"policy": "reservoir", "capacity": 50, "ratio": 0.25},
    "run": {"max_steps": 8},
    # Increment 2 reads two shards: the same two lanes for one process and two, so the same blocks.
    "data": {"lanes": 2},
}


def _recipe(root: Path, run: str, sections: dict[str, dict[str, Any]], **run_keys: Any) -> Path:
    recipe = tiny_recipe(root)
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    recipe["run"].update(dir=str(root / run), **run_keys)
    return write_recipe(root, recipe, f"{run}.yaml")


def _ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    return result


def _release(run_dir: Path) -> dict[str, torch.Tensor]:
    return weights(run_dir / "releases" / "release-0001")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **CLOSE, msg=name)


def _seed_tokens(run_dir: Path) -> list[list[int]]:
    rows = []
    for path in sorted((run_dir / SEED_DIR).glob("batch-*.npz")):
        with np.load(path, allow_pickle=False) as saved:
            rows.append(saved["tokens"].tolist())
    return rows


@pytest.fixture(scope="module")
def wsd_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One increment under WSD with generated replay seeds: one process, DDP and FSDP on two."""
    root = tmp_path_factory.mktemp("wsd")
    add_shard(root / "stream", "alpha", 0, docs=DOCS)
    _ok(_train(_olm(_recipe(root, "single", WSD)), root))
    ddp = _ok(_train(_olm(_recipe(root, "ddp", WSD), processes=2), root))
    assert ddp.stdout.count("increment 1 complete") == 1
    _ok(_train(_olm(_recipe(root, "fsdp", WSD, distributed="fsdp"), processes=2), root))
    return root


def test_generated_replay_seeds_are_shared_out_and_match_one_process(wsd_root: Path) -> None:
    single = _seed_tokens(wsd_root / "single")
    assert len(single) == 3  # 6 samples in batches of 2: rank 0 made batches 0 and 2, rank 1 batch 1
    assert _seed_tokens(wsd_root / "ddp") == single
    assert _seed_tokens(wsd_root / "fsdp") == single


def test_wsd_release_under_ddp_and_fsdp_matches_one_process(wsd_root: Path) -> None:
    reference = _release(wsd_root / "single")
    _assert_close(_release(wsd_root / "ddp"), reference)
    _assert_close(_release(wsd_root / "fsdp"), reference)
    # The trunk is not the release: the cooldown trained on.
    trunk = weights(latest(wsd_root / "fsdp"))
    assert any(not torch.equal(trunk[name], tensor) for name, tensor in _release(wsd_root / "fsdp").items())
    assert not (wsd_root / "fsdp" / "cooldown").exists()  # removed once the release is written


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_killed_mid_cooldown_every_rank_finishes_the_release_bit_identically(wsd_root: Path, tmp_path: Path,
                                                                             mode: str) -> None:
    add_shard(tmp_path / "stream", "alpha", 0, docs=DOCS)
    keys = {"distributed": "fsdp"} if mode == "fsdp" else {}
    recipe = _recipe(tmp_path, "run", WSD, **keys)
    run_dir = tmp_path / "run"
    cooldown = CheckpointManager(run_dir / "cooldown")
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(_olm(recipe, processes=2), cwd=tmp_path, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        from e2e_helpers import wait_for

        wait_for(lambda: bool(cooldown.list()), proc, timeout=240, what="the first cooldown checkpoint")
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()
    assert not (run_dir / "releases" / "release-0001").exists(), "the release was written before the kill"
    if mode == "fsdp":
        assert (cooldown.list()[-1] / "optimizer-sharded" / "__1_0.distcp").is_file()

    rerun = _ok(_train(_olm(recipe, processes=2), tmp_path))
    assert "finishing its cooldown" in rerun.stdout and "resuming at step" in rerun.stdout, rerun.stdout
    assert_bit_identical(_release(run_dir), _release(wsd_root / mode))
    assert not (run_dir / "cooldown").exists()


def test_ewc_and_reptile_under_fsdp_match_one_process(tmp_path: Path) -> None:
    """Two increments (EWC's penalty needs the first one's Fisher); anchors and Fisher checkpointed whole."""
    add_shard(tmp_path / "stream", "alpha", 0)
    runs = {"single": {}, "fsdp": {"distributed": "fsdp"}}
    for increment in (1, 2):
        if increment == 2:
            add_shard(tmp_path / "stream", "beta", 0)
        for run, keys in runs.items():
            _ok(_train(_olm(_recipe(tmp_path, run, ANCHORED, **keys), processes=2 if keys else 1), tmp_path))
    one, two = latest(tmp_path / "single"), latest(tmp_path / "fsdp")
    _assert_close(weights(one), weights(two))
    parts_one, parts_two = load_tree(one / "parts"), load_tree(two / "parts")
    assert parts_two["regularizer"]["estimates"] == 2 and parts_two["meta"]["outer_steps"] > 0
    for part, key in (("regularizer", "anchor"), ("regularizer", "fisher"), ("meta", "anchor")):
        expected, got = parts_one[part][key], parts_two[part][key]
        assert expected.keys() == got.keys()
        for name in expected:  # whole tensors, not rank 0's rows
            assert got[name].shape == expected[name].shape, (part, key, name)
            torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-4, msg=f"{part}.{key}.{name}")


def test_generation_killed_on_two_ranks_resumes_to_the_same_seeds(tmp_path: Path) -> None:
    sections = {"replay": {"policy": "reservoir", "capacity": 80, "ratio": 0.25, "seed_from": "generate",
                           "generate": {"samples": 60, "batch_size": 2, "max_new_tokens": 32}},
                "run": {"max_steps": 2}}
    add_shard(tmp_path / "stream", "alpha", 0)
    _ok(_train(_olm(_recipe(tmp_path, "single", sections)), tmp_path))
    recipe = _recipe(tmp_path, "ddp", sections)
    seeds = tmp_path / "ddp" / SEED_DIR
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(_olm(recipe, processes=2), cwd=tmp_path, env=_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        from e2e_helpers import wait_for

        wait_for(lambda: (seeds / "batch-00003.npz").exists(), proc, timeout=240, what="four generated batches")
    finally:
        _kill_tree(proc)
    written = len(list(seeds.glob("batch-*.npz")))
    assert 4 <= written < 30, f"{written} batches when killed"

    rerun = _ok(_train(_olm(recipe, processes=2), tmp_path))
    assert "already generated by an interrupted run" in rerun.stdout, rerun.stdout
    assert _seed_tokens(tmp_path / "ddp") == _seed_tokens(tmp_path / "single")
