#!/usr/bin/env python
"""What a checkpoint costs the training loop: size on disk, and the step-time hiccup, sync vs async.

A SmolLM2-135M-shaped Llama (hidden 576, 30 layers, vocabulary 49152, tied embeddings; float32,
random weights built from the config, nothing downloaded) trains a few real AdamW steps on
batches of ``--tokens`` random tokens. At step ``--checkpoint-at`` it writes a checkpoint the
way the engine does (``Trainer._checkpoint_with_weights``): a :class:`TrainingSnapshot` of the
weights, optimiser, RNG and tokenizer, staged and published through
:meth:`CheckpointManager.save`, in the training thread (``run.async_checkpoint: false``) or by
the background :class:`CheckpointWriter` (``true``, the default) after a host copy.

Reported for each mode:

* ``hiccup_s``: the step that includes the checkpoint minus the median normal step (the time
  the loop is blocked);
* ``write_s``: how long the write itself took (in the background for async);
* ``overlap_extra_s``: async only, what the steps that ran during the write lost to it (the
  writer and the trainer share the CPU cores and memory bandwidth);
* ``loop_s``: all the steps together, the net effect;
* sizes: the checkpoint written the old way (weights + ``optimizer.pt`` through ``torch.save``)
  and the new way (weights + ``optimizer.safetensors`` + ``optimizer.json``).

    python scripts/bench_checkpoint.py            # ~3 GB of checkpoints under /tmp, deleted after
    python scripts/bench_checkpoint.py --json
    python scripts/bench_checkpoint.py --threads 2 --steps 10 --checkpoint-at 5

The tokenizer is a small BPE trained on generated text (its files are a few hundred KB next to
1.6 GB of tensors); the replay snapshot (hard links) and strategy parts are left out as they
cost milliseconds. On a GPU the host copy is a device-to-host transfer; this script runs on the
CPU, where it is a clone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402
from bench_verify_checkpoint import SMOLLM2_135M  # noqa: E402

from olm_cli.checkpoint_snapshot import TrainingSnapshot, host_copy  # noqa: E402
from olm_cli.rng import capture_rng  # noqa: E402
from olm_cli.rundir.async_writer import CheckpointWriter  # noqa: E402
from olm_cli.rundir.checkpoint import CheckpointManager, format_bytes, read_manifest  # noqa: E402
from olm_cli.rundir.optimizer_state import LEGACY_OPTIMIZER_FILE  # noqa: E402


def build_tokenizer(workdir: Path) -> Any:
    """A small BPE tokenizer trained on generated text (olm's own trainer, as for `init: scratch`)."""
    import random

    from olm_cli.modeling import train_tokenizer

    rng = random.Random(0)
    words = [f"w{i}" for i in range(2000)]
    shard = workdir / "tokenizer-text.jsonl"
    with open(shard, "w", encoding="utf-8") as handle:
        for _ in range(2000):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(60))}) + "\n")
    return train_tokenizer([shard], "text", vocab_size=4096, limit_chars=5_000_000)


# ``--shape tiny`` checks the script itself in seconds (tests/test_bench_checkpoint.py); its figures mean nothing.
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": SMOLLM2_135M,
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": True, "max_position_embeddings": 128},
}


def build_model(shape: str, seed: int) -> tuple[Any, torch.optim.Optimizer]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model.train()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)


def train_step(model: Any, optimizer: torch.optim.Optimizer, tokens: int) -> None:
    batch = torch.randint(0, model.config.vocab_size, (1, tokens))
    model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def checkpoint(manager: CheckpointManager, writer: CheckpointWriter[Path], step: int, model: Any,
               optimizer: torch.optim.Optimizer, tokenizer: Any, *, background: bool) -> dict[str, float]:
    """What ``Trainer._checkpoint_with_weights`` does in the training thread; returns when it would."""
    started = time.perf_counter()
    snapshot = TrainingSnapshot(
        model=model,
        weights=host_copy(model.state_dict(), copy=background),
        tokenizer=tokenizer,
        optimizer=host_copy(optimizer.state_dict(), copy=background),
        rng=capture_rng(),
        parts={},
        trainer_state=json.dumps({"step": step}),
        ledger={},
    )
    timing = {"host_copy_s": time.perf_counter() - started}
    manager.stage(step, lambda directory: None)  # where the engine stages the replay snapshot

    def publish() -> Path:
        path = manager.save(step, snapshot.write, staged=True)
        timing["published_at"] = time.perf_counter()
        timing["write_s"] = timing["published_at"] - started
        return path

    writer.submit(publish)
    if not background:
        writer.wait()
    return timing


def run_mode(workdir: Path, mode: str, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Train ``args.steps`` steps with one checkpoint at ``args.checkpoint_at``; per-step wall times."""
    import copy

    background = mode == "async"
    model, optimizer = build_model(args.shape, args.seed)
    os.sync()  # the previous mode's dirty pages are flushed before this one starts, not during it
    manager = CheckpointManager(workdir / mode / "checkpoints")
    writer: CheckpointWriter[Path] = CheckpointWriter(background=background)
    # The engine writes a private copy of the tokenizer in the background, made once (its first checkpoint).
    writer_tokenizer = copy.deepcopy(tokenizer) if background else tokenizer
    starts: list[float] = []
    times: list[float] = []
    timing: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        starts.append(time.perf_counter())
        train_step(model, optimizer, args.tokens)
        if step == args.checkpoint_at:
            timing = checkpoint(manager, writer, step, model, optimizer, writer_tokenizer, background=background)
        times.append(time.perf_counter() - starts[-1])
    loop_end = time.perf_counter()
    writer.wait()
    path = manager.latest()
    assert path is not None
    index = args.checkpoint_at - 1
    normal = [t for i, t in enumerate(times) if i != index and i >= args.warmup]
    median = statistics.median(normal)
    result: dict[str, Any] = {
        "step_times_s": [round(t, 4) for t in times],
        "loop_s": sum(times),  # every step, the checkpoint and what the write cost the steps after it
        "normal_step_s": median,
        "checkpoint_step_s": times[index],
        "hiccup_s": times[index] - median,
        "host_copy_s": timing["host_copy_s"],
        "write_s": timing["write_s"],
    }
    if background:
        # The steps that started while the write was in flight share the CPU with it.
        during = [t for start, t in zip(starts[index + 1 :], times[index + 1 :], strict=True)
                  if start < timing["published_at"]]
        result["overlap_steps"] = len(during)
        result["overlap_extra_s"] = sum(t - median for t in during)
        result["write_outlasted_the_loop"] = timing["published_at"] > loop_end
    files = {f["path"]: int(f["size"]) for f in read_manifest(path)["files"]}
    result["files"] = files
    result["bytes"] = sum(files.values())
    return result


def legacy_size(workdir: Path, args: argparse.Namespace) -> dict[str, int]:
    """The same shapes written the way olm 0.2 did: weights + optimizer.pt (torch.save)."""
    model, optimizer = build_model(args.shape, args.seed)
    train_step(model, optimizer, args.tokens)
    manager = CheckpointManager(workdir / "legacy" / "checkpoints")

    def write(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        with open(directory / LEGACY_OPTIMIZER_FILE, "wb") as handle:
            torch.save(optimizer.state_dict(), handle)

    path = manager.save(1, write)
    return {f["path"]: int(f["size"]) for f in read_manifest(path)["files"]}


def run(workdir: Path, args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(workdir)
    legacy = legacy_size(workdir, args)
    shutil.rmtree(workdir / "legacy", ignore_errors=True)
    modes = {}
    for mode in args.order.split(","):
        modes[mode] = run_mode(workdir, mode, args, tokenizer)
        shutil.rmtree(workdir / mode, ignore_errors=True)
    weights = sum(size for name, size in legacy.items() if name.startswith("model"))
    return {
        "model": f"{args.shape} shape, float32, random weights",
        "batch": f"1 x {args.tokens} tokens",
        "torch_threads": args.threads,
        "size_before": {"model_bytes": weights, "optimizer_pt_bytes": legacy[LEGACY_OPTIMIZER_FILE],
                        "total_bytes": weights + legacy[LEGACY_OPTIMIZER_FILE]},
        "size_after": {
            "model_bytes": sum(s for n, s in modes["sync"]["files"].items() if n.startswith("model")),
            "optimizer_safetensors_bytes": modes["sync"]["files"]["optimizer.safetensors"],
            "optimizer_json_bytes": modes["sync"]["files"]["optimizer.json"],
            "total_bytes": sum(s for n, s in modes["sync"]["files"].items()
                               if n.startswith(("model", "optimizer"))),
            "checkpoint_bytes": modes["sync"]["bytes"],
        },
        "sync": modes["sync"],
        "async": modes["async"],
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "load_average": os.getloadavg()},
    }


def render(report: dict[str, Any]) -> str:
    before, after = report["size_before"], report["size_after"]
    lines = [f"{report['model']}, batch {report['batch']}, {report['torch_threads']} torch thread(s)",
             f"  size before (weights + optimizer.pt):        {format_bytes(before['total_bytes'])} "
             f"({before['total_bytes']:,} bytes)",
             f"  size after (weights + optimizer.safetensors): {format_bytes(after['total_bytes'])} "
             f"({after['total_bytes']:,} bytes; whole checkpoint {format_bytes(after['checkpoint_bytes'])})"]
    for mode in ("sync", "async"):
        r = report[mode]
        line = (f"  {mode:<5}: normal step {r['normal_step_s']:.3f} s, checkpoint step {r['checkpoint_step_s']:.3f} s, "
                f"hiccup {r['hiccup_s']:.3f} s (host copy {r['host_copy_s']:.3f} s), write {r['write_s']:.2f} s, "
                f"{len(r['step_times_s'])} steps {r['loop_s']:.2f} s")
        if mode == "async":
            line += f", steps during the write lost {r['overlap_extra_s']:.2f} s over {r['overlap_steps']} steps"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m", help="Model shape (tiny: a smoke test).")
    parser.add_argument("--steps", type=int, default=10, help="Training steps per mode.")
    parser.add_argument("--checkpoint-at", type=int, default=4, help="The step that writes the checkpoint.")
    parser.add_argument("--warmup", type=int, default=1, help="First steps left out of the normal-step median.")
    parser.add_argument("--tokens", type=int, default=64, help="Tokens per batch (batch size 1).")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (the writer uses another core).")
    parser.add_argument("--order", choices=["sync,async", "async,sync"], default="sync,async",
                        help="Which mode runs first (to see order effects: page cache, memory).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="Where to write (default: a new folder under /tmp).")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args()
    if not args.warmup < args.checkpoint_at < args.steps:
        parser.error("need --warmup < --checkpoint-at < --steps")

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    workdir = Path(tempfile.mkdtemp(prefix="olm-bench-checkpoint-", dir=args.dir))
    try:
        report = run(workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
