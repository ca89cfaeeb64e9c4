#!/usr/bin/env python
"""Export benchmark: what each ``olm export`` setting costs in size and held-out loss.

A tiny Llama is trained from scratch (one ``olm train`` increment) on two domains of the offline
demo stream (``scripts/build_demo_data.py --offline-only``: Python source, then reference prose),
then its release is exported in every setting below. Each export is loaded back with
``transformers`` (``olm export --check``: ``gguf_file=`` for GGUF) and evaluated on the held-out
files of both domains, so the loss reported is the loss of the file a user would serve, and the
logit difference is measured against the model the file was made from.

    python scripts/bench_export.py                 # ~2 min on 2 CPU cores
    python scripts/bench_export.py --smoke --json  # ~30 s sanity run, JSON on stdout
    python scripts/bench_export.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL: dict[str, Any] = {"shards_per_domain": 2, "shard_kb": 40, "eval_kb": 10, "vocab_size": 1024,
                        "block_size": 128, "batch": 8, "eval_max_tokens": 10_000}
SMOKE: dict[str, Any] = {"shards_per_domain": 1, "shard_kb": 8, "eval_kb": 4, "vocab_size": 512,
                         "block_size": 64, "batch": 8, "eval_max_tokens": 2_000}
DOMAINS = ("code", "prose")

# name -> olm export options (the CLI flags, as keyword arguments of olm_cli.export.export_model)
VARIANTS: dict[str, dict[str, Any]] = {
    "gguf-f32": {"fmt": "gguf", "quantize": "f32"},
    "gguf-f16": {"fmt": "gguf", "quantize": "f16"},
    "gguf-q8_0": {"fmt": "gguf", "quantize": "q8_0"},
    "safetensors-bf16": {"fmt": "safetensors", "dtype": "bfloat16"},
    "prune-0.1": {"fmt": "gguf", "quantize": "f32", "prune": 0.1},
    "prune-0.3": {"fmt": "gguf", "quantize": "f32", "prune": 0.3},
    "prune-0.3-row": {"fmt": "gguf", "quantize": "f32", "prune": 0.3, "prune_scope": "row"},
    "prune-0.5": {"fmt": "gguf", "quantize": "f32", "prune": 0.5},
    "prune-0.5-row": {"fmt": "gguf", "quantize": "f32", "prune": 0.5, "prune_scope": "row"},
    "prune-0.3+q8_0": {"fmt": "gguf", "quantize": "q8_0", "prune": 0.3},
}


def build_data(work: Path, settings: dict[str, Any]) -> Path:
    data = work / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(data),
                    "--shards-per-domain", str(settings["shards_per_domain"]), "--shard-kb", str(settings["shard_kb"]),
                    "--eval-kb", str(settings["eval_kb"]), "--offline-only"],
                   check=True, stdout=subprocess.DEVNULL)
    return data


def recipe(work: Path, data: Path, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"init": "scratch", "arch": {"size": "tiny", "vocab_size": settings["vocab_size"]}},
        "data": {"shards": [str(data / "train" / f"0{i}-{d}" / "*.jsonl") for i, d in enumerate(DOMAINS)],
                 "domain_from": "path", "block_size": settings["block_size"]},
        "batch": {"size": settings["batch"], "micro_batch": settings["batch"]},
        "optim": {"lr": 2e-3, "warmup_steps": 5},
        "run": {"dir": str(work / "run"), "seed": 0, "progress": False},
        "eval": {"sets": {d: str(data / "eval" / f"{d}.jsonl") for d in DOMAINS},
                 "max_tokens": settings["eval_max_tokens"]},
    }


def mean(values: dict[str, float]) -> float:
    return statistics.fmean(values.values())


def run_variant(name: str, options: dict[str, Any], run: Path, out_dir: Path) -> dict[str, Any]:
    from olm_cli.export import export_model

    suffix = "" if options["fmt"] == "safetensors" else ".gguf"
    result = export_model(run=run, checkpoint=None, out=out_dir / f"{name}{suffix}", check=True, **options)
    check = result["check"]
    source_loss = result["prune"]["loss_before"] if "prune" in result else check["reference_loss"]
    return {
        "variant": name,
        "bytes": result["bytes"],
        "size_vs_source": result["bytes"] / result["source_bytes"],
        "loss": check["loss"],
        "mean_loss": mean(check["loss"]),
        "delta_vs_source": mean(check["loss"]) - mean(source_loss),
        "max_abs_logit_diff": check["max_abs_logit_diff"],
        "same_top1": check["same_argmax"],
        "sparsity": result.get("prune", {}).get("sparsity_of_model", 0.0),
        "seconds": result["seconds"],
    }


def print_table(rows: list[dict[str, Any]], source: dict[str, float]) -> None:
    print(f"source (release, float32): mean held-out loss {mean(source):.4f} "
          + " ".join(f"{d}={v:.4f}" for d, v in source.items()))
    print(f"{'variant':<18} {'MiB':>7} {'size':>6} {'loss':>7} {'Δ loss':>8} {'max|Δlogit|':>11} "
          f"{'top-1':>6} {'sparsity':>8} {'s':>5}")
    for r in rows:
        print(f"{r['variant']:<18} {r['bytes'] / 2**20:>7.3f} {r['size_vs_source']:>6.2f} {r['mean_loss']:>7.4f} "
              f"{r['delta_vs_source']:>+8.4f} {r['max_abs_logit_diff']:>11.4f} {r['same_top1']:>6.1%} "
              f"{r['sparsity']:>8.1%} {r['seconds']:>5.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a small, fast sanity run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--variants", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    names = args.variants.split(",") if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}")

    import torch

    from olm_cli.increment import run_increment
    from olm_cli.recipe import load_recipe

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="olm-bench-export-") as tmp:
        work = Path(tmp)
        data = build_data(work, settings)
        config = work / "recipe.yaml"
        config.write_text(yaml.safe_dump(recipe(work, data, settings)), encoding="utf-8")
        outcome = run_increment(load_recipe(config, []))
        if outcome.exit_code != 0:
            print(f"error: training failed: {outcome.message}", file=sys.stderr)
            return 1
        exports = work / "exports"
        exports.mkdir()
        rows = [run_variant(name, VARIANTS[name], work / "run", exports) for name in names]
        from olm_cli.export import export_model

        source = export_model(run=work / "run", checkpoint=None, out=exports / "reference.gguf", quantize="f32",
                              check=True)["check"]["reference_loss"]
    results = {"settings": settings, "steps": outcome.steps, "tokens": outcome.tokens, "source_loss": source,
               "variants": rows, "seconds": round(time.perf_counter() - started, 1),
               "torch_threads": torch.get_num_threads()}
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"trained {outcome.steps} steps ({outcome.tokens:,} tokens); {results['seconds']} s in all")
        print_table(rows, source)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
