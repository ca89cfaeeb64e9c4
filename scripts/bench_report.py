#!/usr/bin/env python
"""What regenerating ``olm report`` costs, the price ``eval.report: true`` adds to every night.

Builds synthetic run directories through olm's own writers (the metrics log, the
continual-learning matrix, the eval and release histories, the shard ledger) and times
:func:`olm_cli.report.write_report` on each, split into gathering the data, drawing the figures
and writing the page (wall time; the whole write also in CPU time, which a busy machine does
not inflate). Sizes: a quickstart-sized run (3 increments, 500 logged steps), a month of
nights (30 increments x 1,000 steps) and a year (365 increments x 1,000 steps = 365,000
lines of ``metrics.jsonl``). Each is timed ``--repeat`` times in this process: the steps one by
one, then the whole write (so the imports are paid before the first whole write is timed).

    python scripts/bench_report.py
    python scripts/bench_report.py --json
    python scripts/bench_report.py --sizes quickstart,month --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olm_cli.evaluation.matrix import ContinualMatrix  # noqa: E402
from olm_cli.rundir.atomic import append_line_durable  # noqa: E402
from olm_cli.rundir.ledger import ShardLedger  # noqa: E402

SIZES = {"quickstart": (3, 500), "month": (30, 1000), "year": (365, 1000)}  # increments, logged steps each
DOMAINS = ("code", "prose", "drama")


def build_run(root: Path, increments: int, steps_per_increment: int, seed: int = 0) -> Path:
    """A run directory with the files a report reads, of the given length."""
    rng = random.Random(seed)
    run = root / "run"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text("# written by bench_report.py\n", encoding="utf-8")
    step = 0
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for increment in range(1, increments + 1):
            for i in range(steps_per_increment):
                step += 1
                handle.write(json.dumps({
                    "step": step, "increment": increment, "increment_step": i + 1,
                    "loss": 4.0 + rng.random() - i / steps_per_increment, "lr": 1e-3 * (1 - i / steps_per_increment),
                    "grad_norm": 1.0, "tokens": 1024 * step, "tokens_per_s": 9000 + 500 * rng.random(),
                    "domain": DOMAINS[increment % 3], "batch_size": 8, "micro_batch": 8, "replayed": 1,
                    "unselected": 0, "time": 1.7e9 + step, "cpu_time": float(step)}) + "\n")
    matrix = ContinualMatrix()
    matrix.add_row("start", None, dict.fromkeys(DOMAINS, 8.0))
    for increment in range(1, increments + 1):
        losses = {d: 4.0 + rng.random() for d in DOMAINS}
        matrix.add_row(f"inc {increment}", DOMAINS[increment % 3], losses)
        append_line_durable(run / "eval" / "history.jsonl", json.dumps(
            {"increment": increment, "step": increment * steps_per_increment, "time": 1.7e9,
             "domains": {d: {"loss": v, "perplexity": 2.0, "tokens": 20000} for d, v in losses.items()}}))
        append_line_durable(run / "releases" / "history.jsonl", json.dumps(
            {"release": f"release-{increment:04d}", "increment": increment, "step": increment * steps_per_increment,
             "released": increment % 7 != 0, "reasons": [] if increment % 7 else ["code loss rose 3%, budget 2%"],
             "gate": {}, "created": "2026-03-01T02:00:00+00:00", "previous": None, "latest": None}))
    matrix.save(run / "eval" / "matrix.json")
    shards = root / "shards"
    shards.mkdir()
    paths = []
    for increment in range(1, increments + 1):
        path = shards / f"{increment:04d}.jsonl"
        path.write_text('{"text": "x"}\n', encoding="utf-8")
        paths.append(path)
    ledger = ShardLedger(run / "ledger.json")
    ledger.scan(paths)
    for increment, path in enumerate(paths, start=1):
        ledger.start_increment()
        ledger.mark_in_progress(path, increment)
        ledger.add_tokens(path, 1024 * steps_per_increment)
        ledger.mark_done(path)
    ledger.save()
    return run


def time_report(run: Path, out: Path) -> dict[str, float]:
    from olm_cli.report.figures import all_figures
    from olm_cli.report.page import render_page
    from olm_cli.report.sources import gather

    started = time.perf_counter()
    data = gather(run)
    gathered = time.perf_counter()
    figures = all_figures(data)
    drawn = time.perf_counter()
    render_page(data, figures)
    laid_out = time.perf_counter()
    from olm_cli.report import write_report

    whole_started, cpu_started = time.perf_counter(), time.process_time()
    write_report(run, out, force=True)
    whole, cpu = time.perf_counter() - whole_started, time.process_time() - cpu_started
    return {"gather_s": gathered - started, "figures_s": drawn - gathered, "page_s": laid_out - drawn,
            "write_report_s": whole, "write_report_cpu_s": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated of {', '.join(SIZES)}")
    parser.add_argument("--repeat", type=int, default=2, help="timings per size (default 2)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {', '.join(unknown)}; choose from {', '.join(SIZES)}")
    results: dict[str, Any] = {"machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                           "load_average": os.getloadavg()}, "sizes": {}}
    scratch = Path(tempfile.mkdtemp(prefix="olm-bench-report-"))
    try:
        for name in sizes:
            increments, steps = SIZES[name]
            run = build_run(scratch / name, increments, steps)
            timings = [time_report(run, scratch / name / "out") for _ in range(args.repeat)]
            results["sizes"][name] = {"increments": increments, "logged_steps": increments * steps,
                                      "metrics_mb": (run / "metrics.jsonl").stat().st_size / 1e6,
                                      "page_kb": (scratch / name / "out" / "index.html").stat().st_size / 1e3,
                                      "timings": timings}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"load average {results['machine']['load_average'][0]:.1f} on {results['machine']['cpus']} CPUs")
    for name, entry in results["sizes"].items():
        print(f"{name}: {entry['increments']} increments, {entry['logged_steps']:,} logged steps "
              f"({entry['metrics_mb']:.1f} MB of metrics.jsonl), page {entry['page_kb']:.0f} KB")
        for i, t in enumerate(entry["timings"], start=1):
            print(f"  run {i}: write_report {t['write_report_s']:.2f} s wall, {t['write_report_cpu_s']:.2f} s CPU  (gather {t['gather_s']:.2f} s, "
                  f"figures {t['figures_s']:.2f} s, page {t['page_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
