#!/usr/bin/env python
"""Training throughput of olm's loop next to a bare PyTorch loop and the HF ``Trainer`` (CPU).

Two settings, measured side by side in one run:

* ``cheapest`` -- the least olm can do per step: random selector, no replay, constant learning
  rate, batch ``--batch`` x ``--block-size``;
* ``quickstart`` -- the recipe of ``configs/quickstart.yaml`` as it is (batch 8 x 128, reservoir
  replay at ratio 0.1, cosine schedule with warm-up), except for the model (the bench's shape and
  tokenizer, so that all three contenders start from the same weights), the data (the bench's
  shards), and eval (off: its paths are the demo's, and it runs only outside the timed window).

In both, the bare loop and the Trainer train the same number of samples of the same length per
step as olm (olm's replayed samples are part of its batch, not extra), with the recipe's AdamW
settings; what each contender does is described in ``scripts/bench_loops.py``. Every contender
runs ``--steps`` optimiser steps; steps 1..``--warmup`` are not timed. Each round runs every
setting and, within it, the contenders in a rotated order; per round the ratios
``olm_over_bare`` and ``olm_over_trainer`` are taken by wall time and by process CPU time
(``time.process_time``, which load from other processes disturbs much less), and the medians
of those per-round ratios are reported with the targets (olm/bare >= 0.98, olm/Trainer >= 1.05).

    python scripts/bench_throughput.py                         # ~8 minutes on 2 CPU cores
    python scripts/bench_throughput.py --json > /tmp/bt.json   # one JSON object on stdout
    python scripts/bench_throughput.py --settings quickstart --rounds 3
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loops import (  # noqa: E402
    CONTENDERS,
    ROOT,
    TrainerSettings,
    Window,
    collate_batches,
    median,
    median_ratio,
    pack_blocks,
    read_texts,
    reset_peak_memory,
    rotated,
    run_bare,
    run_hf_trainer,
    run_olm,
    timed_window,
)

from olm_cli.engine import build_optimizer  # noqa: E402
from olm_cli.modeling import build_scratch_model, train_tokenizer  # noqa: E402
from olm_cli.recipe import recipe_from_dict  # noqa: E402

ARCH = {"size": "small", "vocab_size": 4096, "hidden_size": 192, "num_hidden_layers": 4,
        "num_attention_heads": 4, "intermediate_size": 512}
QUICKSTART = ROOT / "configs" / "quickstart.yaml"
TARGETS = {"olm_over_bare": 0.98, "olm_over_trainer": 1.05}
RATIO_OF = {"olm_over_bare": "bare", "olm_over_trainer": "hf_trainer"}
CPU = torch.device("cpu")


@dataclass
class Setting:
    """One recipe the three contenders are compared on, and the rounds measured for it."""

    name: str
    description: str
    recipe: Callable[[Path], dict[str, Any]]  # run directory -> olm recipe
    batch: int
    block_size: int

    def __post_init__(self) -> None:
        self.rounds: list[dict[str, Any]] = []


def make_data(root: Path) -> list[Path]:
    """Real text: the demo builder's code, prose and drama domains (offline), as jsonl shards in order."""
    out = root / "demo"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(out),
                    "--offline-only", "--shards-per-domain", "3", "--shard-kb", "140"],
                   check=True, stdout=subprocess.DEVNULL)
    return sorted((out / "train").glob("*/*.jsonl"))


def cheapest_setting(shards_dir: Path, tokenizer_dir: Path, args: argparse.Namespace) -> Setting:
    def recipe(run_dir: Path) -> dict[str, Any]:
        return {
            "model": {"init": "scratch", "tokenizer": str(tokenizer_dir), "arch": ARCH},
            "data": {"shards": [str(shards_dir)], "block_size": args.block_size},
            "selector": {"name": "random"},
            "batch": {"size": args.batch, "micro_batch": args.batch},
            "optim": {"lr": 1e-3, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
            "run": {"dir": str(run_dir), "max_steps": args.steps, "checkpoint_every": 10_000, "progress": False,
                    "seed": 0},
        }

    return Setting("cheapest", f"random selector, no replay, constant lr, batch {args.batch} x {args.block_size}",
                   recipe, args.batch, args.block_size)


def quickstart_setting(shards_dir: Path, tokenizer_dir: Path, args: argparse.Namespace) -> Setting:
    base = yaml.safe_load(QUICKSTART.read_text(encoding="utf-8"))
    base["model"] = {"init": "scratch", "tokenizer": str(tokenizer_dir), "arch": ARCH}
    base["data"]["shards"] = [str(shards_dir)]
    base.pop("eval", None)

    def recipe(run_dir: Path) -> dict[str, Any]:
        built = copy.deepcopy(base)
        built["run"].update(dir=str(run_dir), max_steps=args.steps, progress=False)
        return built

    batch, block = base["batch"]["size"], base["data"]["block_size"]
    replay = base["replay"]
    return Setting("quickstart", f"configs/quickstart.yaml: {replay['policy']} replay ratio {replay['ratio']}, "
                   f"{base['optim']['schedule']} lr, batch {batch} x {block}, eval off", recipe, batch, block)


def trainer_settings(recipe: dict[str, Any]) -> TrainerSettings:
    optim = recipe_from_dict(recipe).optim
    return TrainerSettings(lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas, grad_clip=optim.grad_clip,
                           schedule=optim.schedule, warmup_steps=optim.warmup_steps)


def measure(setting: Setting, name: str, run_dir: Path, tokenizer: Any, blocks: list[Any],
            args: argparse.Namespace) -> Window:
    """One contender, once, on ``setting``."""
    recipe = setting.recipe(run_dir)
    reset_peak_memory(CPU)
    if name == "olm":
        return run_olm(recipe, steps=args.steps, warmup=args.warmup, device=CPU)
    parsed = recipe_from_dict(recipe)
    model = build_scratch_model(parsed.model, tokenizer, seed=parsed.run.seed)  # olm's initial weights
    pad_id = int(tokenizer.pad_token_id)
    if name == "bare":
        batches = collate_batches(blocks, setting.batch, pad_id)
        return run_bare(model, build_optimizer(model, parsed), batches, warmup=args.warmup,
                        grad_clip=parsed.optim.grad_clip, device=CPU)
    return run_hf_trainer(model, blocks, batch=setting.batch, steps=args.steps, warmup=args.warmup,
                          settings=trainer_settings(recipe), output_dir=run_dir, pad_id=pad_id, device=CPU)


def summarise(setting: Setting) -> dict[str, Any]:
    """Medians over rounds: of each contender's tokens/s, and of the per-round ratios."""
    def rates(name: str, kind: str) -> list[float | None]:
        return [r["contenders"][name]["tokens_per_s"][kind] for r in setting.rounds]

    summary: dict[str, Any] = {"description": setting.description, "batch": setting.batch,
                               "block_size": setting.block_size}
    for ratio, other in RATIO_OF.items():
        summary[ratio] = {m: median_ratio(rates("olm", m), rates(other, m)) for m in ("wall", "cpu")}
    summary["tokens_per_s"] = {name: {m: median(rates(name, m)) for m in ("wall", "cpu")} for name in CONTENDERS}
    summary["rounds"] = setting.rounds
    return summary


def verdicts(summaries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target in each setting, judged by wall time and by CPU time."""
    out = []
    for name, summary in summaries.items():
        for ratio, minimum in TARGETS.items():
            row: dict[str, Any] = {"setting": name, "ratio": ratio, "min": minimum}
            for measure in ("wall", "cpu"):
                value = summary[ratio][measure]
                row[measure] = {"value": value, "pass": value is not None and value >= minimum}
            out.append(row)
    return out


def print_tables(report: dict[str, Any]) -> None:
    meta = report["model"]
    print(f"\nmodel {meta['parameters'] / 1e6:.1f}M params; {report['args']['steps']} steps "
          f"({report['args']['warmup']} warm-up), {report['args']['rounds']} rounds, "
          f"torch threads {report['machine']['torch_threads']}")
    for name, summary in report["settings"].items():
        print(f"\n{name}: {summary['description']}")
        print(f"{'loop':<12}{'tokens/s wall':>15}{'tokens/cpu-s':>15}    wall tokens/s per round")
        for contender in CONTENDERS:
            rates = summary["tokens_per_s"][contender]
            rounds = "  ".join(f"{r['contenders'][contender]['tokens_per_s']['wall']:,.0f}" for r in summary["rounds"])
            cpu = f"{rates['cpu']:,.0f}" if rates["cpu"] is not None else "n/a"
            print(f"{contender:<12}{rates['wall']:>15,.0f}{cpu:>15}    {rounds}")
    print("\ntargets (median of per-round ratios):")
    for row in report["targets"]:
        judged = "   ".join(f"{m} {_fmt(row[m]['value'])} {'PASS' if row[m]['pass'] else 'FAIL'}" for m in ("wall", "cpu"))
        print(f"  {row['setting']:<11} {row['ratio']:<17} >= {row['min']:.2f}:   {judged}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per contender and round")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed (at least 1, below --steps)")
    parser.add_argument("--batch", type=int, default=16, help="batch of the cheapest setting")
    parser.add_argument("--block-size", type=int, default=128, help="block of the cheapest setting")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--settings", default="cheapest,quickstart",
                        help="comma-separated, from: cheapest, quickstart")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    args = parser.parse_args()
    args.warmup = timed_window(args.warmup, args.steps)
    builders = {"cheapest": cheapest_setting, "quickstart": quickstart_setting}
    chosen = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in builders]
    if unknown or not chosen:
        parser.error(f"--settings: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(builders)}")
    progress = sys.stderr if args.json else sys.stdout
    load_before = os.getloadavg()
    began = time.monotonic()

    # Libraries print to stdout (the Trainer its summary); with --json, stdout holds the JSON alone.
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(progress):
        root = Path(tmp)
        shards = make_data(root)
        tokenizer = train_tokenizer(shards, "text", ARCH["vocab_size"], 2_000_000)
        tokenizer.save_pretrained(root / "tokenizer")
        settings = [builders[name](shards[0].parents[1], root / "tokenizer", args) for name in chosen]
        blocks = {s.name: pack_blocks(read_texts(shards), tokenizer, s.block_size, args.steps * s.batch)
                  for s in settings}
        for r in range(args.rounds):
            for index, setting in enumerate(settings):
                order = rotated(CONTENDERS, r + index)
                windows = {name: measure(setting, name, root / f"{setting.name}-{name}-{r}", tokenizer,
                                         blocks[setting.name], args) for name in order}
                setting.rounds.append({"round": r + 1, "order": order,
                                       "contenders": {n: windows[n].as_dict() for n in CONTENDERS}})
                print(f"round {r + 1} {setting.name}: " + ", ".join(
                    f"{n} {windows[n].tokens_per_s()['wall']:,.0f} tok/s" for n in order), file=progress, flush=True)
        parameters = sum(p.numel() for p in build_scratch_model(
            recipe_from_dict(settings[0].recipe(root / "count")).model, tokenizer, seed=0).parameters())

    summaries = {s.name: summarise(s) for s in settings}
    report = {
        "benchmark": "bench_throughput",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average_before": load_before,
                    "load_average_after": os.getloadavg()},
        "args": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch": args.batch,
                 "block_size": args.block_size, "settings": chosen},
        "model": {"parameters": parameters, "arch": ARCH},
        "seconds": round(time.monotonic() - began, 1),
        "settings": summaries,
        "targets": verdicts(summaries),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_tables(report)


if __name__ == "__main__":
    main()
