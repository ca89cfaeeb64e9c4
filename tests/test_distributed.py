"""Two processes on CPU (torchrun + gloo) train the same increment as one process would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from safetensors.torch import load_file

# End to end (torchrun with two real processes): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def _train(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed")
def test_two_process_data_parallel_matches_single_process(tmp_path: Path) -> None:
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = tiny_recipe(tmp_path, replay={"policy": "reservoir", "capacity": 50, "ratio": 0.25})
    single = write_recipe(tmp_path, recipe, "single.yaml")
    recipe["run"]["dir"] = str(tmp_path / "run2")
    double = write_recipe(tmp_path, recipe, "double.yaml")

    one = _train([sys.executable, "-m", "olm_cli", "train", "--config", str(single)], tmp_path)
    assert one.returncode == 0, one.stderr
    two = _train([TORCHRUN, "--nproc_per_node", "2", "-m", "olm_cli", "train", "--config", str(double)], tmp_path)
    assert two.returncode == 0, two.stderr + two.stdout
    assert two.stdout.count("increment 1 complete") == 1  # only rank 0 reports

    a = load_file(str(tmp_path / "run" / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(tmp_path / "run2" / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        # Same global batch, gradients averaged over ranks: equal up to reduction order.
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    assert (tmp_path / "run2" / "ledger.json").read_text().count('"status": "done"') == 1
