#!/usr/bin/env python
"""Data work per rank with lanes (``data.lanes``): 1 process reading everything vs N reading one lane each.

Each world size runs real processes (gloo on the CPU, a file rendezvous) that drain the same
shards through :class:`~olm_cli.data.lanes.LaneStream` with one lane per process, ``--batch``
blocks per take, read inline (no read-ahead thread, so the CPU time is the reading,
tokenising and packing plus the exchange). Per rank: CPU seconds of the process, wall seconds,
the tokens its own lanes produced, and the blocks it received (every rank receives every block:
the global sequence). Without lanes every rank did the one-process work; the figure that matters
is the busiest rank's CPU time against one process's.

The tokenizer is GPT-2's 49k BPE when its files are in ``build/tokenizers/gpt2/`` (see
scripts/bench_data.py), else a BPE trained on the bench text (the output says which).

    python scripts/bench_lanes.py --json > /tmp/lanes.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_data import GPT2_DIR, PATTERN, gpt2_tokenizer  # noqa: E402
from bench_pipeline import make_shards  # noqa: E402


def _rank(rank: int, world: int, work: Path, shards: list[str], block_size: int, batch: int) -> None:
    """One process: join the group, drain the stream, write what it measured."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from olm_cli.data import BlockStream
    from olm_cli.data.lanes import LaneStream, lane_exchange

    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{work / f'rendezvous-{world}'}", rank=rank,
                                world_size=world)
    tokenizer = AutoTokenizer.from_pretrained(work / "tokenizer")

    def lane(paths: list[Path], lanes: int) -> BlockStream:
        return BlockStream(paths, tokenizer, block_size=block_size, domain_pattern=PATTERN, bad_records="quarantine")

    stream = LaneStream(shards, lane, lanes=world, exchange=lane_exchange())
    if world > 1:
        dist.barrier()
    cpu, wall = time.process_time(), time.perf_counter()
    received = 0
    while blocks := stream.take(batch):
        received += len(blocks)
    result = {"rank": rank, "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall,
              "own_tokens": stream.read.tokens, "own_shards": len(stream.read.shards), "blocks_received": received}
    (work / f"result-{world}-{rank}.json").write_text(json.dumps(result))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def run_world(world: int, work: Path, shards: list[str], block_size: int, batch: int) -> list[dict[str, Any]]:
    if world == 1:
        _rank(0, 1, work, shards, block_size, batch)
    else:
        import torch.multiprocessing as mp

        mp.start_processes(_rank, args=(world, work, shards, block_size, batch), nprocs=world, start_method="spawn")
    return [json.loads((work / f"result-{world}-{rank}.json").read_text()) for rank in range(world)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=24)
    parser.add_argument("--docs", type=int, default=60, help="documents per shard (30-90 words each)")
    parser.add_argument("--block-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="blocks per take (a step's pool)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = make_shards(work / "data", args.shards, args.docs)
        if (GPT2_DIR / "encoder.json").is_file():
            tokenizer, name = gpt2_tokenizer(), "gpt2_49k"
        else:
            from olm_cli.modeling import train_tokenizer

            tokenizer, name = train_tokenizer(paths[:3], "text", 4096, 2_000_000), "quickstart_bpe (GPT-2 files absent)"
        tokenizer.save_pretrained(work / "tokenizer")
        shards = [str(p) for p in paths]
        worlds = {world: run_world(world, work, shards, args.block_size, args.batch) for world in args.worlds}

    one = max(r["cpu_s"] for r in worlds[min(worlds)])
    report = {
        "tokenizer": name, "shards": args.shards, "block_size": args.block_size, "batch": args.batch,
        "worlds": {str(world): {"ranks": ranks, "busiest_rank_cpu_s": max(r["cpu_s"] for r in ranks),
                                "busiest_rank_cpu_over_one_process": max(r["cpu_s"] for r in ranks) / one}
                   for world, ranks in worlds.items()},
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{name}: {args.shards} shards, blocks of {args.block_size}, {args.batch} blocks per take")
    for world, row in report["worlds"].items():
        for r in row["ranks"]:
            print(f"  {world} process(es), rank {r['rank']}: cpu {r['cpu_s']:.2f}s, wall {r['wall_s']:.2f}s, "
                  f"own lanes {r['own_tokens']:,} tokens from {r['own_shards']} shards, received {r['blocks_received']:,} blocks")
        print(f"  {world} process(es): busiest rank {row['busiest_rank_cpu_over_one_process']:.2f}x one process's CPU")


if __name__ == "__main__":
    main()
