#!/usr/bin/env python
"""Reptile on a drifting stream: forgetting and forward transfer with and without ``optim.meta``.

A tiny Llama is trained from scratch through the offline demo stream
(``scripts/build_demo_data.py``: code -> prose -> drama), one ``olm train`` increment
(:func:`olm_cli.increment.run_increment`) per domain, in three arms that differ only in the
update rule:

* ``plain``:        AdamW at ``--lr``,
* ``reptile``:      the same, with ``optim.meta: {method: reptile, inner_steps: k, outer_lr: eps}``,
* ``plain-lr-eps``: AdamW at ``eps x --lr`` without Reptile, the control for "Reptile is only a
  smaller step" (every outer step keeps eps of the window's displacement).

Same seed, tokenizer, data and steps in every arm. The engine evaluates every domain after each
increment (``RUN/eval/matrix.json``), and the script reports the matrix summary of
:class:`olm_cli.evaluation.matrix.ContinualMatrix`: the mean final loss, forgetting, backward
transfer (bwt) and forward transfer (fwt, negative = earlier domains already helped).

    python scripts/bench_reptile.py --json                  # ~6 min on 2 busy CPU cores
    python scripts/bench_reptile.py --smoke --json          # ~1 min sanity run
    python scripts/bench_reptile.py --inner-steps 4 --outer-lr 0.3 --seeds 0,1
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL: dict[str, Any] = {"shard_kb": 120, "eval_kb": 20, "vocab_size": 2048, "block_size": 128, "batch": 8,
                        "eval_max_tokens": 20_000, "arch": {"size": "tiny"}}
SMOKE: dict[str, Any] = {"shard_kb": 20, "eval_kb": 4, "vocab_size": 512, "block_size": 64, "batch": 8,
                         "eval_max_tokens": 2_000,
                         "arch": {"size": "tiny", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                  "intermediate_size": 64}}


def build_data(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    out = work / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(out), "--offline-only",
                    "--shards-per-domain", "1", "--shard-kb", str(settings["shard_kb"]),
                    "--eval-kb", str(settings["eval_kb"]), "--force"], check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for domain in manifest["domains"]:
        domain["train"] = [str(out / p) for p in domain["train"]]
        domain["eval"] = str(out / domain["eval"])
    return manifest


def arm_recipe(run: Path, data: dict[str, Any], settings: dict[str, Any], *, lr: float, seed: int,
               meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": {"init": "scratch", "arch": {**settings["arch"], "vocab_size": settings["vocab_size"]}},
        "data": {"shards": [str(run / "stream" / "*" / "*.jsonl")], "block_size": settings["block_size"]},
        "batch": {"size": settings["batch"], "micro_batch": settings["batch"]},
        "optim": {"lr": lr, "warmup_steps": 5, "meta": meta},
        "run": {"dir": str(run / "run"), "seed": seed, "checkpoint_every": 10_000, "progress": False},
        "eval": {"sets": {d["name"]: d["eval"] for d in data["domains"]}, "max_tokens": settings["eval_max_tokens"],
                 "batch_size": 16},
    }


def run_arm(work: Path, name: str, data: dict[str, Any], settings: dict[str, Any], *, lr: float, seed: int,
            meta: dict[str, Any], say: Any) -> dict[str, Any]:
    """Feed the domains one increment at a time; the matrix summary at the end."""
    from olm_cli.evaluation.domains import MATRIX_FILE
    from olm_cli.evaluation.matrix import ContinualMatrix
    from olm_cli.increment import run_increment
    from olm_cli.recipe import recipe_from_dict

    root = work / f"{name}-seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    steps = []
    for order, domain in enumerate(data["domains"]):
        for path in domain["train"]:
            target = root / "stream" / f"{order:02d}-{domain['name']}" / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)
        outcome = run_increment(recipe_from_dict(arm_recipe(root, data, settings, lr=lr, seed=seed, meta=meta)))
        if outcome.status != "increment_complete":
            raise RuntimeError(f"{name}: {outcome.status} {outcome.message}")
        steps.append(outcome.steps)
        say(f"{name} seed {seed}: increment {order + 1} ({domain['name']}) {outcome.steps} steps")
    matrix = ContinualMatrix.from_json(root / "run" / MATRIX_FILE)
    summary = matrix.summary()
    return {"steps": steps, "average_final_loss": summary["average_final_loss"],
            "mean_forgetting": summary["mean_forgetting"], "bwt": summary["bwt"], "fwt": summary["fwt"],
            "matrix": {"domains": list(matrix.domains), "rows": matrix.rows}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a ~1 min sanity run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--inner-steps", type=int, default=8, help="optim.meta.inner_steps k (default 8)")
    parser.add_argument("--outer-lr", type=float, default=0.5, help="optim.meta.outer_lr eps (default 0.5)")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    settings = SMOKE if args.smoke else FULL
    seeds = [int(s) for s in args.seeds.split(",")]
    reptile = {"method": "reptile", "inner_steps": args.inner_steps, "outer_lr": args.outer_lr}
    arms = {"plain": (args.lr, {"method": "none"}), "reptile": (args.lr, reptile),
            "plain-lr-eps": (args.lr * args.outer_lr, {"method": "none"})}

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="olm-bench-reptile-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = build_data(work, settings)
        for name, (lr, meta) in arms.items():
            runs = [run_arm(work, name, data, settings, lr=lr, seed=seed, meta=meta, say=say) for seed in seeds]
            results[name] = {"lr": lr, "meta": meta, "runs": runs} | {
                key: statistics.fmean(r[key] for r in runs if r[key] is not None)
                for key in ("average_final_loss", "mean_forgetting", "bwt", "fwt")
                if any(r[key] is not None for r in runs)
            }
    output = {"settings": settings | {"seeds": seeds, "lr": args.lr}, "arms": results}
    if args.json:
        print(json.dumps(output, indent=2))
    else:
        print("| arm | lr | meta | mean final loss | forgetting | bwt | fwt |\n|---|---:|---|---:|---:|---:|---:|")
        for name, arm in results.items():
            meta = arm["meta"]
            label = "none" if meta["method"] == "none" else f"reptile k={meta['inner_steps']} eps={meta['outer_lr']}"
            print(f"| {name} | {arm['lr']:g} | {label} | {arm.get('average_final_loss', float('nan')):.3f} | "
                  f"{arm.get('mean_forgetting', float('nan')):+.3f} | {arm.get('bwt', float('nan')):+.3f} | "
                  f"{arm.get('fwt', float('nan')):+.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
