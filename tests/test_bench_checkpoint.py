"""Smoke test of scripts/bench_checkpoint.py at a toy shape: the plumbing and the report's keys.

The figures need the 135M shape on quiet cores (docs/run-directory.md quotes them); here the
script must run both modes through the real snapshot, writer and CheckpointManager.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_checkpoint.py"


@pytest.mark.slow
def test_bench_checkpoint_reports_sizes_and_hiccups_for_both_modes(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--shape", "tiny", "--steps", "5", "--checkpoint-at", "3",
                           "--dir", str(tmp_path), "--json"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

    before, after = report["size_before"], report["size_after"]
    assert after["optimizer_safetensors_bytes"] > after["model_bytes"]  # two moments per weight
    assert after["optimizer_json_bytes"] > 0 and before["optimizer_pt_bytes"] > 0
    assert after["model_bytes"] == before["model_bytes"]
    assert abs(after["total_bytes"] - before["total_bytes"]) < 0.05 * before["total_bytes"]
    for mode in ("sync", "async"):
        result = report[mode]
        assert len(result["step_times_s"]) == 5
        assert result["write_s"] > 0 and result["checkpoint_step_s"] > 0
        assert {"optimizer.safetensors", "optimizer.json", "model.safetensors"} <= set(result["files"])
    assert report["async"]["overlap_steps"] >= 0 and "overlap_extra_s" in report["async"]
    assert list(tmp_path.iterdir()) == []  # the checkpoints were removed
