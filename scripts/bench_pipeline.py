#!/usr/bin/env python
"""The training stream alone: inline reading vs the read-ahead worker (``data.prefetch``), CPU.

* ``stream``: tokens/s of one pass (every block taken, no training step) through the plain
  inline stream and through :class:`~olm_cli.pipeline.PrefetchStream`. Nothing overlaps here,
  so this is the worker's overhead (a queue, a position snapshot per chunk, a per-block call).
* ``with_step``: a fake training step of ``--step-ms`` milliseconds (``time.sleep``, which
  releases the GIL as a GPU step or torch's CPU kernels do) after every ``take`` of
  ``--batch`` blocks; reports the time the step waits in ``take`` (median and p95 per step)
  and the whole run's tokens/s for each ``--depths`` (0 = inline). That wait is what prefetch
  removes: the step no longer waits for reading and tokenisation.

The tokenizer is GPT-2's 49k-vocabulary BPE (``build/tokenizers/gpt2/``, see
scripts/bench_data.py for how to get its two files; nothing is downloaded here), else the
quickstart-style BPE trained on the bench text (the output says which).

    python scripts/bench_pipeline.py --json > /tmp/bp.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_data import GPT2_DIR, PATTERN, gpt2_tokenizer, rounds, write_jsonl  # noqa: E402
from conftest import make_documents  # noqa: E402

from olm_cli.data import BlockStream  # noqa: E402
from olm_cli.modeling import train_tokenizer  # noqa: E402
from olm_cli.pipeline import PrefetchStream  # noqa: E402


def make_shards(root: Path, shards: int, docs: int) -> list[Path]:
    domains = ["alpha", "beta", "gamma"]
    return [write_jsonl(root / f"{i % 3:02d}-{domains[i % 3]}" / f"s{i:04d}.jsonl", make_documents(domains[i % 3], docs, i))
            for i in range(shards)]


def make_stream(shards: list[Path], tokenizer: Any, block_size: int, depth: int, batch: int) -> Any:
    def plain() -> BlockStream:
        return BlockStream(shards, tokenizer, block_size=block_size, domain_pattern=PATTERN)

    return plain() if depth == 0 else PrefetchStream(plain(), replica=plain, chunk_blocks=batch, depth=depth)


def one_pass(stream: Any, batch: int) -> int:
    tokens = 0
    while blocks := stream.take(batch):
        tokens += sum(len(b) for b in blocks)
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    return tokens


def with_step(stream: Any, batch: int, step_s: float) -> dict[str, float]:
    """Take a batch, 'train' for ``step_s``; the wait per step and the tokens/s of the whole run."""
    waits: list[float] = []
    tokens = 0
    started = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        blocks = stream.take(batch)
        waits.append(time.perf_counter() - t0)
        if not blocks:
            break
        tokens += sum(len(b) for b in blocks)
        time.sleep(step_s)
    wall = time.perf_counter() - started
    close = getattr(stream, "close", None)
    if close is not None:
        close()
    waits.sort()
    return {"steps": len(waits) - 1, "wait_ms_median": 1000 * statistics.median(waits),
            "wait_ms_p95": 1000 * waits[int(0.95 * (len(waits) - 1))], "wait_ms_total": 1000 * sum(waits),
            "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=60)
    parser.add_argument("--docs", type=int, default=40, help="documents per shard (30-90 words each)")
    parser.add_argument("--block-size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8, help="blocks per step")
    parser.add_argument("--step-ms", type=float, default=40.0)
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.shards, args.docs)
        if (GPT2_DIR / "encoder.json").is_file():
            tokenizer, name = gpt2_tokenizer(), "gpt2_49k"
        else:
            tokenizer, name = train_tokenizer(shards[:3], "text", 4096, 2_000_000), "quickstart_bpe (GPT-2 files absent)"
        total = one_pass(make_stream(shards, tokenizer, args.block_size, 0, args.batch), args.batch)
        stream_times = rounds({
            "inline": lambda: one_pass(make_stream(shards, tokenizer, args.block_size, 0, args.batch), args.batch),
            "prefetch_4": lambda: one_pass(make_stream(shards, tokenizer, args.block_size, 4, args.batch), args.batch),
        }, args.rounds)
        stream = {k: {**v, "tokens_per_s": total / v["wall_s"]} for k, v in stream_times.items()}
        stepped = {f"prefetch_{d}" if d else "inline":
                   with_step(make_stream(shards, tokenizer, args.block_size, d, args.batch), args.batch, args.step_ms / 1000)
                   for d in args.depths}
    report = {
        "tokenizer": name, "tokens": total, "block_size": args.block_size, "batch": args.batch,
        "step_ms": args.step_ms, "stream": stream,
        "stream_prefetch_over_inline_tokens_per_s": stream["prefetch_4"]["tokens_per_s"] / stream["inline"]["tokens_per_s"],
        "with_step": stepped,
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{name}: {total:,} tokens, blocks of {args.block_size}, {args.batch} blocks per step")
    for key, row in stream.items():
        print(f"  stream alone  {key:<11} {row['tokens_per_s']:>12,.0f} tok/s  (cpu {row['cpu_s']:.2f}s, wall {row['wall_s']:.2f}s)")
    for key, row in stepped.items():
        print(f"  {args.step_ms:.0f} ms step  {key:<11} wait/step median {row['wait_ms_median']:.2f} ms, p95 "
              f"{row['wait_ms_p95']:.2f} ms; {row['tokens_per_s']:,.0f} tok/s overall")


if __name__ == "__main__":
    main()
