"""scripts/bench_throughput.py and scripts/bench_gpu.py: the reports' shape, and the pieces they share.

The smoke runs check the plumbing (every contender trains in every setting, the JSON carries
every figure and a verdict per target), not the figures: those need the full run on quiet
cores, or a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

from bench_gpu import MODELS, ModelShape, flops_per_token, peak_flops  # noqa: E402
from bench_loops import median_ratio, pack_blocks, rotated, timed_window  # noqa: E402

CONTENDERS = {"olm", "bare", "hf_trainer"}


def _run_json(script: str, *args: str, timeout: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args, "--json"], capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # stdout holds the JSON object alone


def _positive(value: object) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------- shared pieces (fast)


def test_rotation_puts_every_contender_first_once() -> None:
    names = ["olm", "bare", "hf_trainer"]
    firsts = [rotated(names, r)[0] for r in range(3)]
    assert sorted(firsts) == sorted(names)
    assert all(sorted(rotated(names, r)) == sorted(names) for r in range(5))


def test_median_ratio_is_taken_per_round_and_skips_missing_rounds() -> None:
    # Per-round ratios 3, 0.5, 2 -> 2; the ratio of the medians (3 / 2) would let one noisy round decide.
    assert median_ratio([3.0, 1.0, 10.0], [1.0, 2.0, 5.0]) == 2.0
    assert median_ratio([3.0, None], [1.0, 2.0]) == 3.0  # an OOM round has no ratio
    assert median_ratio([None], [1.0]) is None


def test_timed_window_keeps_one_warmup_and_one_timed_step() -> None:
    assert timed_window(5, 30) == 5
    assert timed_window(5, 2) == 1
    assert timed_window(0, 10) == 1
    with pytest.raises(SystemExit):
        timed_window(1, 1)


class _WordTokenizer:
    """One token per character; EOS is 0."""

    eos_token_id = 0

    def __call__(self, texts: list[str], **_: object) -> dict[str, list[list[int]]]:
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def test_pack_blocks_joins_documents_with_eos_into_full_blocks() -> None:
    blocks = pack_blocks(["abc", "de", "fghij"], _WordTokenizer(), block_size=4, count=3)
    assert [b.tolist() for b in blocks] == [[97, 98, 99, 0], [100, 101, 0, 102], [103, 104, 105, 106]]
    with pytest.raises(SystemExit, match="not enough text"):
        pack_blocks(["abc"], _WordTokenizer(), block_size=4, count=2)
    assert all(b.dtype == np.int32 for b in blocks)


def test_flops_per_token_counts_matmuls_and_attention() -> None:
    shape = ModelShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=32, tied=True, batch=1,
                       batch_80gb=1, seq=4)
    assert flops_per_token(1000, shape) == 6 * 1000 + 12 * 2 * 8 * 4
    # The 1B shape at 2048 tokens: ~8.2 GFLOP/token with Llama-3.2-1B's 1.236B parameters.
    assert 8.0e9 < flops_per_token(1_235_814_400, MODELS["1b"]) < 8.5e9


def test_peak_flops_unknown_on_cpu_unless_given() -> None:
    import torch

    assert peak_flops(torch.device("cpu"), None) == ("cpu", None)
    assert peak_flops(torch.device("cpu"), 1e12) == ("cpu", 1e12)


def test_a_failing_contender_is_recorded_and_the_others_still_count(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    import bench_gpu
    import torch

    def out_of_memory(*_: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB\nmore detail")

    def broken(*_: object) -> None:
        raise RuntimeError("no kernel image\n  for this device")

    monkeypatch.setitem(bench_gpu.CONTENDER_RUNNERS, "hf_trainer", out_of_memory)
    monkeypatch.setitem(bench_gpu.CONTENDER_RUNNERS, "olm", broken)
    bench = SimpleNamespace(device=torch.device("cpu"), shape=MODELS["1b"], batch=8)
    assert bench_gpu.measure(bench, "hf_trainer", tmp_path) == {
        "error": "out of memory: CUDA out of memory. Tried to allocate 8.00 GiB"}
    assert bench_gpu.measure(bench, "olm", tmp_path) == {"error": "RuntimeError: no kernel image for this device"}

    bare = {"tokens": 100, "wall_s": 1.0, "cpu_s": 1.0, "tokens_per_s": {"wall": 100.0, "cpu": 100.0}}
    rounds = [{"round": 1, "order": ["olm", "bare", "hf_trainer"], "olm": {"error": "x"}, "bare": bare,
               "hf_trainer": {"error": "out of memory"}}]
    summary = bench_gpu.summarise(bench, rounds, {"parameters": 10, "matmul_parameters": 10}, peak=1e15)
    assert summary["contenders"]["olm"]["tokens_per_s"] is None and summary["contenders"]["olm"]["errors"] == ["x"]
    assert summary["contenders"]["bare"]["mfu"] == pytest.approx(100 * summary["flops_per_token"] / 1e15)
    assert summary["olm_over_bare"] is None
    verdicts = bench_gpu.verdicts({"1b": summary})
    assert [(v["target"], v["pass"]) for v in verdicts] == [("olm_over_bare", None), ("olm_mfu", None)]


# --------------------------------------------------------------------------- smoke runs (slow)


@pytest.mark.slow
def test_throughput_smoke_json_has_both_settings_and_every_target() -> None:
    report = _run_json("bench_throughput.py", "--steps", "2", "--rounds", "1", timeout=300)
    assert set(report["settings"]) == {"cheapest", "quickstart"}
    for name, setting in report["settings"].items():
        for ratio in ("olm_over_bare", "olm_over_trainer"):
            assert set(setting[ratio]) == {"wall", "cpu"}
            assert _positive(setting[ratio]["wall"]) and _positive(setting[ratio]["cpu"]), (name, ratio, setting[ratio])
        assert set(setting["tokens_per_s"]) == CONTENDERS
        assert len(setting["rounds"]) == 1
        contenders = setting["rounds"][0]["contenders"]
        assert set(contenders) == CONTENDERS
        # One timed step of the setting's batch, for every contender alike.
        assert {c["tokens"] for c in contenders.values()} == {setting["batch"] * setting["block_size"]}
    assert report["settings"]["quickstart"]["batch"] == 8  # configs/quickstart.yaml's batch, not --batch
    targets = {(t["setting"], t["ratio"]): t for t in report["targets"]}
    assert set(targets) == {(s, r) for s in ("cheapest", "quickstart") for r in ("olm_over_bare", "olm_over_trainer")}
    assert {t["min"] for t in targets.values()} == {0.98, 1.05}
    for target in targets.values():
        for measure in ("wall", "cpu"):
            assert target[measure]["pass"] == (target[measure]["value"] >= target["min"])


@pytest.mark.slow
def test_gpu_bench_dry_run_reports_every_model_and_contender() -> None:
    report = _run_json("bench_gpu.py", "--dry-run", timeout=300)
    assert report["dry_run"] is True
    assert set(report["models"]) == {"135m", "1b"}
    for name, model in report["models"].items():
        assert model["shape"]["tied"] is MODELS[name].tied
        assert model["shape"]["kv_heads"] < model["shape"]["heads"]  # grouped-query attention, as the real shapes
        assert set(model["contenders"]) == CONTENDERS
        for row in model["contenders"].values():
            assert _positive(row["tokens_per_s"]), row
            assert row["mfu"] is None  # no peak FLOP/s is known for a CPU
        assert _positive(model["olm_over_bare"]) and _positive(model["olm_over_trainer"])
    verdicts = {(t["model"], t["target"]): t for t in report["targets"]}
    assert set(verdicts) == {("135m", "olm_over_bare"), ("1b", "olm_over_bare"), ("1b", "olm_mfu")}
    assert verdicts[("1b", "olm_mfu")]["pass"] is None  # not measured, neither passed nor failed



@pytest.mark.slow
def test_gpu_bench_dry_run_fsdp_reports_its_overhead() -> None:
    """--fsdp adds olm sharded with FSDP2 over a world of one (gloo on the CPU in a dry run)."""
    report = _run_json("bench_gpu.py", "--dry-run", "--fsdp", "--models", "135m", timeout=300)
    model = report["models"]["135m"]
    assert set(model["contenders"]) == CONTENDERS | {"olm_fsdp"}
    assert _positive(model["contenders"]["olm_fsdp"]["tokens_per_s"])
    assert model["fsdp_over_olm"] == pytest.approx(model["contenders"]["olm_fsdp"]["tokens_per_s"]
                                                   / model["contenders"]["olm"]["tokens_per_s"])
    assert model["fsdp_overhead"] == pytest.approx(1 - model["fsdp_over_olm"])
    assert report["args"]["fsdp"] is True
