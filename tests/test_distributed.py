"""Two processes on CPU (torchrun + gloo): DDP and FSDP2 train the same increment as one process would.

Weights are compared, not losses: a reduction that summed instead of averaging (gloo's AVG under
FSDP2, pytorch issue 162338) would still make the loss go down. Tolerance: float32 gradients
reduced in another order differ in the last bits, and 16 AdamW steps carry that on; the runs here
agree to about 3e-7, and the bound is 1e-5 absolute (+1e-4 relative).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import assert_bit_identical, last_step, latest, ledger_summary, wait_for, weights

# End to end (torchrun with two real processes): outside the fast loop, ``-m 'not slow'``.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                       reason="torchrun not installed"),
]

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
REPO = Path(__file__).resolve().parents[1]
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO), "COLUMNS": "400"}


def _olm(recipe: Path, *, processes: int = 1) -> list[str]:
    launcher = [TORCHRUN, "--nproc_per_node", str(processes)] if processes > 1 else [sys.executable]
    return [*launcher, "-m", "olm_cli", "train", "--config", str(recipe)]


def _train(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _recipe(root: Path, run: str, **run_keys: Any) -> Path:
    # A scoring selector over three micro-batches of the pool: rank 0 scores two, rank 1 one (and,
    # under FSDP, whose forward is a collective, a spare one); the scores are all-gathered.
    recipe = tiny_recipe(root, replay={"policy": "reservoir", "capacity": 50, "ratio": 0.25},
                         selector={"name": "entropy", "pool_factor": 2, "score_micro_batch": 2})
    recipe["run"].update(dir=str(root / run), **run_keys)
    return write_recipe(root, recipe, f"{run}.yaml")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process and FSDP on two, trained once for the tests below."""
    root = tmp_path_factory.mktemp("distributed")
    add_shard(root / "stream", "alpha", 0)
    one = _train(_olm(_recipe(root, "single")), root)
    assert one.returncode == 0, one.stderr
    fsdp = _train(_olm(_recipe(root, "fsdp", distributed="fsdp"), processes=2), root)
    assert fsdp.returncode == 0, fsdp.stderr + fsdp.stdout
    assert fsdp.stdout.count("increment 1 complete") == 1  # only rank 0 reports
    return root


def _assert_close(run: Path, reference: Path) -> None:
    a, b = weights(latest(reference)), weights(latest(run))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], **CLOSE, msg=name)


def test_two_process_data_parallel_matches_single_process(root: Path) -> None:
    two = _train(_olm(_recipe(root, "ddp"), processes=2), root)
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("increment 1 complete") == 1
    # Same global batch, gradients averaged over ranks: equal up to reduction order.
    _assert_close(root / "ddp", root / "single")
    assert (root / "ddp" / "ledger.json").read_text().count('"status": "done"') == 1


def test_fsdp_matches_single_process_and_saves_a_loadable_model(root: Path) -> None:
    from transformers import AutoModelForCausalLM

    _assert_close(root / "fsdp", root / "single")
    assert ledger_summary(root / "fsdp") == ledger_summary(root / "single")
    checkpoint = latest(root / "fsdp")
    # The optimiser stays sharded (one file per rank); the weights are gathered, in HF format.
    assert sorted(p.name for p in (checkpoint / "optimizer-sharded").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                     "__1_0.distcp"]
    assert not (checkpoint / "optimizer.safetensors").exists()
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    assert "optimizer-sharded/__1_0.distcp" in {item["path"] for item in manifest["files"]}
    released = AutoModelForCausalLM.from_pretrained(root / "fsdp" / "releases" / "latest")
    for name, tensor in weights(checkpoint).items():
        torch.testing.assert_close(released.get_parameter(name).detach(), tensor, rtol=0, atol=0, msg=name)


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """kill -9 torchrun and both ranks at once, as a node failure would (the ranks run in sessions of their own)."""
    import psutil

    ranks = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGKILL)  # torchrun first: it must not see its ranks die and report them
    for rank in ranks:
        rank.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(ranks, timeout=30)


def _kill_two_ranks_mid_increment(recipe: Path, cwd: Path, run: Path) -> None:
    """Train ``recipe`` on two ranks and kill -9 them all once step 5's checkpoint is published
    (run.checkpoint_every) and step 7 trained: mid-increment, with work after the checkpoint."""
    log = cwd / "killed.log"
    published = run / "checkpoints" / "latest"
    with open(log, "wb") as handle:
        proc = subprocess.Popen(_olm(recipe, processes=2), cwd=cwd, env=_env(), stdout=handle,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: published.exists() and last_step(run) >= 7, proc, timeout=240,
                 what="a checkpoint and step 7")
    finally:
        _kill_tree(proc)
    assert proc.returncode == -signal.SIGKILL, log.read_text()


def test_fsdp_kill_9_mid_increment_resumes_bit_identically(root: Path, tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0)
    # Checkpoints written in the training thread, so step 5's is published before step 6 (a slow
    # background write could otherwise outlast the increment); the weights do not depend on it.
    recipe = _recipe(tmp_path, "run", distributed="fsdp", async_checkpoint=False)
    _kill_two_ranks_mid_increment(recipe, tmp_path, tmp_path / "run")
    assert json.loads((latest(tmp_path / "run") / "trainer_state.json").read_text())["increment_complete"] is False
    # The same checkpoint resumed at another world size: DCP reshards the optimiser (2 ranks -> 1).
    shutil.copytree(tmp_path / "run", tmp_path / "one", symlinks=True)
    one_recipe = _recipe(tmp_path, "one", distributed="fsdp", async_checkpoint=False)

    resumed = _train(_olm(recipe, processes=2), tmp_path)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resuming increment 1" in resumed.stdout
    assert_bit_identical(weights(latest(tmp_path / "run")), weights(latest(root / "fsdp")))
    assert list(ledger_summary(tmp_path / "run").values()) == list(ledger_summary(root / "fsdp").values())

    alone = _train(_olm(one_recipe), tmp_path)
    assert alone.returncode == 0, alone.stderr + alone.stdout
    assert "resuming increment 1" in alone.stdout
    _assert_close(tmp_path / "one", root / "fsdp")


def _rank_processes(proc: subprocess.Popen[bytes]) -> dict[int, Any]:
    """torchrun's rank processes by rank (read from each child's environment)."""
    import psutil

    ranks = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env:
            ranks[int(env["RANK"])] = child
    return ranks


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(root: Path, tmp_path: Path) -> None:
    """A signal seen by rank 1 alone: the ranks agree at the next step, checkpoint together and exit 143."""
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = _recipe(tmp_path, "run", distributed="fsdp", async_checkpoint=False)
    log = tmp_path / "stopped.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([*_olm(recipe, processes=2)[:1], "--redirects", "3", "--log-dir",
                                 str(tmp_path / "logs"), *_olm(recipe, processes=2)[1:]],
                                cwd=tmp_path, env=_env(), stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: last_step(tmp_path / "run") >= 3 and len(_rank_processes(proc)) == 2, proc, timeout=240,
                 what="step 3")
        _rank_processes(proc)[1].send_signal(signal.SIGTERM)
        proc.wait(timeout=120)  # a rank waiting for the other at a collective would hang here
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    text = log.read_text()
    assert proc.returncode == 1, text  # torchrun: some rank exited non-zero
    # torchrun's summary: "rank : N (local_rank: N)" then "exitcode : C" for every failed rank.
    lines = [line.split() for line in text.splitlines() if line.strip().startswith(("rank ", "exitcode "))]
    codes = {int(rank[2]): int(code[2]) for rank, code in zip(lines[::2], lines[1::2], strict=True)}
    # Both ranks leave with SIGTERM's documented code; once the first has exited, torchrun sends its
    # own SIGTERM to the other, which may reach it after it has left the loop, during the
    # interpreter's exit (-15): which rank exits first is a race, so either may show it.
    assert 143 in codes.values() and set(codes.values()) <= {143, -signal.SIGTERM}, text
    rank_logs = "".join(p.read_text() for p in (tmp_path / "logs").rglob("stdout.log"))
    assert "stopped by signal 15; checkpoint written" in rank_logs, rank_logs
    stopped_at = json.loads((latest(tmp_path / "run") / "trainer_state.json").read_text())
    assert stopped_at["increment_complete"] is False and stopped_at["global_step"] >= 3
    # Rank 0 saw no signal, yet took the checkpoint branch at the same step: its optimiser shard is
    # in the checkpoint next to rank 1's (a collective both ranks entered together).
    shards = sorted(p.name for p in (latest(tmp_path / "run") / "optimizer-sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    resumed = _train(_olm(recipe, processes=2), tmp_path)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resuming increment 1" in resumed.stdout
    assert_bit_identical(weights(latest(tmp_path / "run")), weights(latest(root / "fsdp")))
