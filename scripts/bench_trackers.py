"""Tracker cost per logged step: what `run.trackers` adds to a step that logs (`run.log_every`).

    .venv/bin/python scripts/bench_trackers.py                     # tensorboard, mlflow queued and synchronous
    .venv/bin/python scripts/bench_trackers.py --steps 500 --json

Each row logs the tags of a real metrics line (`olm_cli.trackers.step_tags`, 11 tags) through
`Trackers.log` for ``--steps`` steps into a temporary run directory and reports the mean time
the call takes (what the training step waits for), then the time `close()` takes to flush.
MLflow uses its default store for a run directory (SQLite in `RUN/mlflow.db`); "mlflow (sync)"
is the same tracker with `synchronous=True`, the cost olm avoids by queueing.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROW = {"step": 0, "increment": 1, "increment_step": 0, "loss": 2.5, "lr": 3e-4, "grad_norm": 0.8, "tokens": 4096,
       "tokens_per_s": 12000.0, "domain": "code", "batch_size": 16, "micro_batch": 8, "replayed": 2,
       "unselected": 0, "pool_mean_entropy": 3.1, "time": 0.0, "cpu_time": 0.0}


def measure(tracker: str, steps: int, synchronous: bool, tmp: Path) -> dict[str, Any]:
    import olm_cli.trackers as trackers_module
    from olm_cli.recipe import recipe_from_dict

    # One run directory per row, under one temporary folder for the whole process.
    run_dir = tmp / f"run-{tracker}-{'sync' if synchronous else 'queued'}"
    recipe = recipe_from_dict({"model": {"init": "scratch"}, "data": {"shards": [str(tmp / "x")]},
                               "run": {"dir": str(run_dir), "trackers": [tracker]}})
    options = dict(trackers_module.LOG_OPTIONS)
    if synchronous:
        trackers_module.LOG_OPTIONS["mlflow"] = {"synchronous": True}
    try:
        trackers = trackers_module.Trackers.open(recipe, say=print)
        tags = trackers_module.step_tags(ROW)
        started = time.perf_counter()
        for step in range(1, steps + 1):
            trackers.log(tags, step)
        logging = time.perf_counter() - started
        started = time.perf_counter()
        trackers.close()
        closing = time.perf_counter() - started
    finally:
        trackers_module.LOG_OPTIONS.clear()
        trackers_module.LOG_OPTIONS.update(options)
    name = f"{tracker} (sync)" if synchronous else tracker
    return {"tracker": name, "steps": steps, "tags": len(tags), "ms_per_step": 1000 * logging / steps,
            "close_s": closing}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--trackers", default="tensorboard,mlflow,mlflow-sync",
                        help="comma-separated: tensorboard, mlflow, mlflow-sync")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name.removesuffix("-sync"), args.steps, name.endswith("-sync"), Path(tmp))
                for name in args.trackers.split(",")]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'tracker':<18} {'tags':>5} {'ms/step':>9} {'close s':>8}")
    for row in rows:
        print(f"{row['tracker']:<18} {row['tags']:>5} {row['ms_per_step']:>9.3f} {row['close_s']:>8.2f}")


if __name__ == "__main__":
    main()
