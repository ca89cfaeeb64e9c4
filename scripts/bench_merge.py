#!/usr/bin/env python
"""Federated-merge benchmark: ``olm merge --weights tokens`` (FedAvg) against a uniform average.

Two sites start from one shared base model and each trains on its own data, of unequal size;
only their releases are merged. The data is the offline demo stream
(``scripts/build_demo_data.py --offline-only``):

* base: a tiny Llama trained from scratch on shard 0 of both domains (code, prose), so both
  sites share its tokenizer and weights;
* site A: continues the base on code shards 1..N (``--shards-a``, default 2);
* site B: continues the base on prose shard 1 (``--shards-b``, default 1).

Every model is evaluated on the held-out code and prose files. FedAvg minimises the sites'
losses weighted by their data, ``sum_k n_k/n * F_k`` (McMahan et al., arXiv 1602.05629), so the
table reports that pooled loss (weights = each site's share of the trained tokens) next to the
plain mean of the two domains.

    python scripts/bench_merge.py                  # ~4 min on 2 CPU cores
    python scripts/bench_merge.py --smoke --json   # ~1 min sanity run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL: dict[str, Any] = {"shards": 3, "shard_kb": 40, "eval_kb": 10, "vocab_size": 1024, "block_size": 128,
                        "batch": 8, "eval_max_tokens": 10_000}
SMOKE: dict[str, Any] = {"shards": 2, "shard_kb": 8, "eval_kb": 4, "vocab_size": 512, "block_size": 64,
                         "batch": 8, "eval_max_tokens": 2_000}


def build_data(work: Path, settings: dict[str, Any], shards: int) -> Path:
    data = work / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(data),
                    "--shards-per-domain", str(shards), "--shard-kb", str(settings["shard_kb"]),
                    "--eval-kb", str(settings["eval_kb"]), "--offline-only"],
                   check=True, stdout=subprocess.DEVNULL)
    return data


def train(work: Path, name: str, shards: list[Path], settings: dict[str, Any], model: dict[str, Any]) -> Path:
    """One increment over ``shards`` (copied into the site's own data folder) in ``work/name``."""
    from olm_cli.increment import run_increment
    from olm_cli.recipe import load_recipe

    site_data = work / f"{name}-data"
    for shard in shards:
        target = site_data / shard.parent.name / shard.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(shard, target)
    recipe = {
        "model": model,
        "data": {"shards": [str(site_data / "*" / "*.jsonl")], "domain_from": "path",
                 "block_size": settings["block_size"]},
        "batch": {"size": settings["batch"], "micro_batch": settings["batch"]},
        "optim": {"lr": 2e-3, "warmup_steps": 5},
        "run": {"dir": str(work / name), "seed": 0, "progress": False},
    }
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    outcome = run_increment(load_recipe(config, []))
    if outcome.exit_code != 0:
        raise SystemExit(f"error: training {name} failed: {outcome.message}")
    return work / name


def evaluate(model_dir: Path, sets: dict[str, str], settings: dict[str, Any]) -> dict[str, float]:
    from olm_cli.evaluation.domains import evaluate_domains
    from olm_cli.modeling import load_pretrained, load_tokenizer

    model = load_pretrained(str(model_dir))
    results = evaluate_domains(model, load_tokenizer(str(model_dir)), sets, block_size=settings["block_size"],
                               max_tokens=settings["eval_max_tokens"], batch_size=8)
    return {domain: row["loss"] for domain, row in results.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small, fast sanity run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--shards-a", type=int, default=2, help="code shards site A trains on (default 2)")
    parser.add_argument("--shards-b", type=int, default=1, help="prose shards site B trains on (default 1)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    if args.smoke:
        args.shards_a, args.shards_b = 1, 1

    import torch

    from olm_cli.merge import merge_runs
    from olm_cli.rundir.ledger import ShardLedger

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="olm-bench-merge-") as tmp:
        work = Path(tmp)
        data = build_data(work, settings, 1 + max(args.shards_a, args.shards_b))
        code = sorted((data / "train" / "00-code").glob("*.jsonl"))
        prose = sorted((data / "train" / "01-prose").glob("*.jsonl"))
        sets = {"code": str(data / "eval" / "code.jsonl"), "prose": str(data / "eval" / "prose.jsonl")}
        base = train(work, "base", [code[0], prose[0]], settings,
                     {"init": "scratch", "arch": {"size": "tiny", "vocab_size": settings["vocab_size"]}})
        start = {"init": "pretrained", "name_or_path": str((base / "releases" / "latest").resolve())}
        site_a = train(work, "site-a", code[1 : 1 + args.shards_a], settings, start)
        site_b = train(work, "site-b", prose[1 : 1 + args.shards_b], settings, start)
        tokens = {name: ShardLedger.load(run / "ledger.json").total_tokens
                  for name, run in (("site-a", site_a), ("site-b", site_b))}
        merged = {
            "uniform": merge_runs([site_a, site_b], None, work / "uniform"),
            "tokens": merge_runs([site_a, site_b], None, work / "tokens", by_tokens=True),
        }
        share = {"code": tokens["site-a"] / sum(tokens.values()), "prose": tokens["site-b"] / sum(tokens.values())}
        rows = []
        for name, directory in (("base", base / "releases" / "latest"), ("site A only", site_a / "releases" / "latest"),
                                ("site B only", site_b / "releases" / "latest"), ("uniform average", work / "uniform"),
                                ("FedAvg (tokens)", work / "tokens")):
            losses = evaluate(directory, sets, settings)
            rows.append({"model": name, "loss": losses,
                         "pooled": sum(share[d] * losses[d] for d in losses),
                         "mean": sum(losses.values()) / len(losses)})
    results = {"settings": settings, "tokens": tokens, "token_share": share,
               "weights": {k: v["weights"] for k, v in merged.items()}, "rows": rows,
               "seconds": round(time.perf_counter() - started, 1)}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"site A trained {tokens['site-a']:,} tokens of code, site B {tokens['site-b']:,} of prose; "
          f"FedAvg weights {results['weights']['tokens'][0]:.3f} / {results['weights']['tokens'][1]:.3f}")
    print(f"{'model':<18} {'code':>7} {'prose':>7} {'pooled':>7} {'mean':>7}")
    for row in rows:
        print(f"{row['model']:<18} {row['loss']['code']:>7.4f} {row['loss']['prose']:>7.4f} "
              f"{row['pooled']:>7.4f} {row['mean']:>7.4f}")
    print(f"{results['seconds']} s in all")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
