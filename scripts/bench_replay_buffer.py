"""Replay buffer benchmark: insert and sample throughput, memory and snapshot cost.

    .venv/bin/python scripts/bench_replay_buffer.py                      # reservoir, 10k/100k/1M
    .venv/bin/python scripts/bench_replay_buffer.py --sizes 100000 --policies all

Each (policy, size) runs in a fresh subprocess so RSS figures do not leak between rows.
"RSS Δ" is the growth over the process after imports, i.e. what the buffer costs; blocks are
a torch-free stand-in for ``olm_cli.samples.Block`` because importing torch would add a few
hundred MB that have nothing to do with the buffer (the engine process pays them anyway).
Token data lives in a temporary directory (1M x 128 int32 = 512 MB on disk).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BATCH = 256
DRAWS = 32
SAMPLE_CALLS = 2000


@dataclass(frozen=True)
class BenchBlock:
    """Same fields as olm_cli.samples.Block, without importing torch."""

    tokens: np.ndarray
    shard: str
    domain: str


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def rss_mb() -> float:
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """VmHWM, not ru_maxrss: the latter inherits the forking parent's peak across exec."""
    return _status_mb("VmHWM")


def one(policy: str, size: int, block_len: int) -> dict[str, float]:
    from olm_cli.replay import REPLAY_BUFFERS, DiskReplayBuffer, ReplayConfig
    from olm_cli.strategy import StrategyContext

    rng = np.random.default_rng(0)
    pool = rng.integers(0, 50_000, size=(BATCH, block_len), dtype=np.int32)
    domains = ["web", "code", "math", "books"]
    baseline = rss_mb()
    with tempfile.TemporaryDirectory(prefix="olm-bench-replay-") as tmp:
        cfg = ReplayConfig(policy=policy, capacity=size)
        buffer = REPLAY_BUFFERS.build(cfg, StrategyContext(seed=0, run_dir=Path(tmp) / "run"))
        assert isinstance(buffer, DiskReplayBuffer)

        def batches(count: int, offset: int):
            for start in range(0, count, BATCH):
                n = min(BATCH, count - start)
                blocks = [
                    BenchBlock(pool[j], f"shard-{(offset + start) // 100_000}", domains[j % 4])
                    for j in range(n)
                ]
                yield blocks, rng.random(n).tolist(), (offset + start) // BATCH

        t0 = time.perf_counter()
        for blocks, scores, step in batches(size, 0):
            buffer.add(blocks, step, scores=scores)  # type: ignore[arg-type]
        fill_s = time.perf_counter() - t0

        churn = min(size, 100_000)
        t0 = time.perf_counter()
        for blocks, scores, step in batches(churn, size):
            buffer.add(blocks, step, scores=scores)  # type: ignore[arg-type]
        churn_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for _ in range(SAMPLE_CALLS):
            items = buffer.sample(DRAWS)
            buffer.update_scores([item.id for item in items], [1.0] * len(items))
        sample_s = time.perf_counter() - t0
        rss = rss_mb()

        t0 = time.perf_counter()
        buffer.save(Path(tmp) / "ckpt" / "replay")
        save_s = time.perf_counter() - t0
        peak = peak_rss_mb()  # insert, sample and save phases; the restore below is a 2nd buffer
        disk_mb = buffer.store.disk_bytes / 2**20
        size_before = len(buffer)
        buffer.close()
        del buffer
        restored = REPLAY_BUFFERS.build(cfg, StrategyContext(seed=1, run_dir=Path(tmp) / "run2"))
        t0 = time.perf_counter()
        restored.load(Path(tmp) / "ckpt" / "replay")
        load_s = time.perf_counter() - t0
        assert len(restored) == size_before
        return {
            "policy": policy,
            "size": size,
            "fill_per_s": size / fill_s,
            "churn_per_s": churn / churn_s,
            "sample_per_s": SAMPLE_CALLS * DRAWS / sample_s,
            "baseline_mb": baseline,
            "rss_mb": rss,
            "rss_delta_mb": rss - baseline,
            "peak_mb": peak,
            "disk_mb": disk_mb,
            "save_s": save_s,
            "load_s": load_s,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--policies", default="reservoir", help="comma list, or 'all'")
    parser.add_argument("--block-len", type=int, default=128)
    parser.add_argument("--one", nargs=2, metavar=("POLICY", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.block_len)))
        return

    from rich.console import Console
    from rich.table import Table

    from olm_cli.replay import REPLAY_POLICIES

    policies = list(REPLAY_POLICIES) if args.policies == "all" else args.policies.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    table = Table(title=f"replay buffer, {args.block_len}-token blocks, batches of {BATCH}")
    headers = (
        "policy", "samples", "fill/s", "full insert/s", "sample/s", "RSS MB", "RSS Δ MB",
        "peak MB", "disk MB", "save s", "load s",
    )  # fmt: skip
    for header in headers:
        table.add_column(header, justify="left" if header == "policy" else "right")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for policy in policies:
        for size in sizes:
            out = subprocess.run(
                [sys.executable, __file__, "--one", policy, str(size), "--block-len", str(args.block_len)],
                check=True, capture_output=True, text=True, env=env,
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            table.add_row(
                policy,
                f"{size:,}",
                f"{r['fill_per_s']:,.0f}",
                f"{r['churn_per_s']:,.0f}",
                f"{r['sample_per_s']:,.0f}",
                f"{r['rss_mb']:.0f}",
                f"{r['rss_delta_mb']:.0f}",
                f"{r['peak_mb']:.0f}",
                f"{r['disk_mb']:.0f}",
                f"{r['save_s']:.2f}",
                f"{r['load_s']:.2f}",
            )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
