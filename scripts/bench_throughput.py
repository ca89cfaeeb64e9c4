#!/usr/bin/env python
"""Training throughput of olm's loop next to a bare PyTorch loop and the HF ``Trainer``.

Same model (a from-scratch Llama with identical initial weights), same token blocks, same batch
size, same AdamW settings, one process. Each contender runs ``--steps`` optimizer steps; the
first ``--warmup`` steps are excluded from the timing. Rounds alternate the contenders so that
machine noise hits all of them alike, and the median over rounds is reported.

olm's figure is measured from its own metrics timestamps, so it includes everything its loop
does per step (stream reading and packing, selection, replay bookkeeping, ledger, logging), but
not start-up or the final checkpoint.

    python scripts/bench_throughput.py            # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olm_cli.data import BlockStream, discover_shards  # noqa: E402
from olm_cli.modeling import build_scratch_model, train_tokenizer  # noqa: E402
from olm_cli.recipe import recipe_from_dict  # noqa: E402
from olm_cli.samples import collate  # noqa: E402

ARCH = {"size": "small", "vocab_size": 4096, "hidden_size": 192, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 512}


def make_data(root: Path) -> Path:
    """Real text: the demo builder's code and prose domains (offline)."""
    import subprocess

    out = root / "demo"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(out),
                    "--offline-only", "--shards-per-domain", "3", "--shard-kb", "140"],
                   check=True, stdout=subprocess.DEVNULL)
    return out / "train"


def recipe_dict(shards: str, tokenizer_dir: Path, run_dir: Path, args: argparse.Namespace) -> dict:
    return {
        "model": {"init": "scratch", "tokenizer": str(tokenizer_dir), "arch": ARCH},
        "data": {"shards": [shards], "block_size": args.block_size},
        "batch": {"size": args.batch, "micro_batch": args.batch},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
        "run": {"dir": str(run_dir), "max_steps": args.steps, "checkpoint_every": 10_000, "progress": False,
                "seed": 0},
    }


def bench_olm(recipe: dict, args: argparse.Namespace) -> float:
    from olm_cli.increment import run_increment as train

    outcome = train(recipe_from_dict(recipe))
    assert outcome.steps == args.steps, outcome
    rows = [json.loads(line) for line in (Path(recipe["run"]["dir"]) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    # tokens/time between the end of the warm-up step and the end of the last step
    tokens = sum(r["batch_size"] for r in timed[1:]) * args.block_size
    return tokens / (timed[-1]["time"] - timed[0]["time"])


def make_model(cfg_dict: dict, tokenizer) -> torch.nn.Module:
    cfg = recipe_from_dict(cfg_dict).model
    return build_scratch_model(cfg, tokenizer, seed=0)


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    from olm_cli.engine import build_optimizer

    return build_optimizer(model, recipe_from_dict(CURRENT_RECIPE))


def bench_bare(model: torch.nn.Module, batches: list[dict], args: argparse.Namespace) -> float:
    optimizer = make_optimizer(model)
    model.train()
    start = 0.0
    for step, batch in enumerate(batches[: args.steps]):
        if step == args.warmup:
            start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return (args.steps - args.warmup) * args.batch * args.block_size / elapsed


def bench_hf_trainer(model: torch.nn.Module, blocks: list, args: argparse.Namespace, out: Path, pad_id: int) -> float:
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            times.append(time.perf_counter())

    dataset = Dataset.from_dict({"input_ids": [b.tokens.tolist() for b in blocks]})
    training_args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=1e-3,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95,
        max_grad_norm=1.0, logging_strategy="no", save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=lambda rows: collate([torch.tensor(r["input_ids"]).numpy() for r in rows], pad_id),
                      callbacks=[Clock()])
    trainer.train()
    tokens = (args.steps - args.warmup - 1) * args.batch * args.block_size
    return tokens / (times[-1] - times[args.warmup])


CURRENT_RECIPE: dict = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_dir = make_data(root)
        shards = discover_shards([str(train_dir)])
        tokenizer = train_tokenizer(shards, "text", ARCH["vocab_size"], 2_000_000)
        tokenizer.save_pretrained(root / "tokenizer")
        stream = BlockStream(shards, tokenizer, block_size=args.block_size,
                             domain_pattern=r"(?:\d+-)?(?P<domain>[^/]+)/[^/]+$")
        wanted = args.steps * args.batch
        blocks = [b for b in stream.take(2 * wanted) if len(b) == args.block_size][:wanted]
        if len(blocks) < args.steps * args.batch:
            raise SystemExit(f"not enough data: {len(blocks)} blocks for {args.steps} steps")
        pad_id = int(tokenizer.pad_token_id)
        batches = [collate([b.tokens for b in blocks[i : i + args.batch]], pad_id)
                   for i in range(0, args.steps * args.batch, args.batch)]
        results: dict[str, list[float]] = {"olm": [], "bare": [], "hf_trainer": []}
        global CURRENT_RECIPE
        contenders = {
            "bare": lambda r: bench_bare(make_model(CURRENT_RECIPE, tokenizer), batches, args),
            "olm": lambda r: bench_olm(CURRENT_RECIPE, args),
            "hf_trainer": lambda r: bench_hf_trainer(make_model(CURRENT_RECIPE, tokenizer), blocks, args,
                                                     root / f"hf{r}", pad_id),
        }
        order = list(contenders)
        for r in range(args.rounds):
            CURRENT_RECIPE = recipe_dict(str(train_dir), root / "tokenizer", root / f"run{r}", args)
            # Rotate who goes first, so warm-up and drift effects hit every contender alike.
            for name in order[r % 3:] + order[: r % 3]:
                results[name].append(contenders[name](r))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} tok/s" for k, v in results.items()), flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    params = sum(p.numel() for p in make_model(CURRENT_RECIPE, tokenizer).parameters())
    print()
    print(f"model {params / 1e6:.1f}M params, batch {args.batch} x {args.block_size} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.rounds} rounds, torch threads {torch.get_num_threads()}")
    print(f"{'loop':<12}{'tokens/s (median)':>20}    all rounds")
    for name, values in results.items():
        print(f"{name:<12}{med[name]:>20,.0f}    {'  '.join(f'{v:,.0f}' for v in values)}")
    # Rounds run minutes apart on a shared VM; ratios within a round cancel most of the drift.
    vs_bare = statistics.median(o / b for o, b in zip(results["olm"], results["bare"], strict=True))
    vs_trainer = statistics.median(o / t for o, t in zip(results["olm"], results["hf_trainer"], strict=True))
    print()
    print(f"olm / bare loop  = {vs_bare:.3f}   (median of per-round ratios; target >= 0.95)")
    print(f"olm / HF Trainer = {vs_trainer:.3f}   (median of per-round ratios; target >= 1.05)")


if __name__ == "__main__":
    main()
