#!/usr/bin/env python
"""Forgetting benchmark: how much of the first domain survives training through the others.

A tiny Llama is pre-trained from scratch on the first domain of the offline demo stream
(``scripts/build_demo_data.py``: code -> prose -> drama), then trained through the remaining
domains, one ``olm train`` increment (:func:`olm_cli.increment.run_increment`) per domain, with
each countermeasure variant. Every variant continues a copy of the same pre-training run
directory, so all start from the same weights, optimiser moments, replay buffer (every block of
the first domain, with its top-k logits) and EWC Fisher. The engine evaluates every domain after
every increment (``eval.sets`` -> ``RUN/eval/matrix.json``, whose row 0 is the randomly
initialised model; the script adds that row itself for engines older than b51bfb0) and the script
computes forgetting with :class:`olm_cli.evaluation.matrix.ContinualMatrix`.

All runs share one tokenizer, trained once on the union of the domains' training text, so every
variant and the union reference see the same vocabulary.

Replay variants are compute-equivalent to naive training: same batch size, same number of
steps. ``round(ratio * batch)`` rows of each batch come from the buffer, so a replay variant
trains on only the first ``(batch - replayed) / batch`` of each new domain's documents (the
engine would otherwise carry the rest into the next increment). Union retraining is the
reference: at every increment it trains, from the pre-trained checkpoint, one pass over all the
data seen so far (documents of all domains shuffled into one shard); its compute is the sum of
those retrainings.

    python scripts/bench_forgetting.py --out results.json          # full run, ~25 min on 2 CPU cores
    python scripts/bench_forgetting.py --smoke                     # ~1 min sanity run
    python scripts/bench_forgetting.py --variants naive,replay25,union --seeds 0
    python scripts/bench_forgetting.py --out results.json --docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olm_cli.evaluation.matrix import ContinualMatrix  # noqa: E402

# ---------------------------------------------------------------------------- settings

FULL: dict[str, Any] = {
    "shards_per_domain": 3,
    "shard_kb": 60,
    "eval_kb": 20,
    "arch": {"size": "tiny", "vocab_size": 2048},
    "block_size": 128,
    "batch": 16,
    "lr": 2e-3,
    "warmup": 10,
    "eval_max_tokens": 20_000,
}
SMOKE: dict[str, Any] = {
    "shards_per_domain": 1,
    "shard_kb": 12,
    "eval_kb": 4,
    "arch": {"size": "tiny", "vocab_size": 512, "hidden_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "intermediate_size": 64},
    "block_size": 64,
    "batch": 8,
    "lr": 2e-3,
    "warmup": 2,
    "eval_max_tokens": 2_000,
}


@dataclass(frozen=True)
class Variant:
    """One countermeasure: recipe overrides (dotted keys) applied to every continual increment."""

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    union: bool = False

    @property
    def replay_ratio(self) -> float:
        return float(self.overrides.get("replay.ratio", 0.0)) if self.overrides.get("replay.policy", "none") != "none" else 0.0


def _replay(ratio: float, **extra: Any) -> dict[str, Any]:
    return {"replay.policy": "reservoir", "replay.ratio": ratio, **extra}


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("naive", "naive sequential"),
    Variant("replay1", "replay 1%", _replay(0.01)),
    Variant("replay5", "replay 5%", _replay(0.05)),
    Variant("replay25", "replay 25%", _replay(0.25)),
    Variant("replay50", "replay 50%", _replay(0.50)),
    Variant("union", "union retraining", union=True),
    Variant("lwf", "replay 5% + LwF", _replay(0.05, **{"distill.method": "lwf"})),
    Variant("stored_logits", "replay 5% + stored logits", _replay(0.05, **{"distill.method": "stored_logits"})),
    Variant("ewc", "EWC", {"regularize.method": "ewc", "regularize.strength": 1000.0}),
    Variant("const_lr", "constant low LR", {"optim.schedule": "constant", "optim.lr": 5e-4}),
    # The combination tried as "best". A first full run tried replay 25% + stored logits (cut
    # 58%); that run's strongest single measures were replay 50% and LwF, so they are combined.
    Variant("best", "replay 50% + LwF", _replay(0.50, **{"distill.method": "lwf"})),
    # Not in the default set: blocks drawn from a buffer mixing the increment's documents, shards
    # and domains (data.shuffle_buffer; its size set by --shuffle-buffer).
    Variant("shuffle", "naive + shuffle buffer", {"data.shuffle_buffer": 64}),
]}
OPT_IN = {"shuffle"}


# ---------------------------------------------------------------------------- recipes


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "replay.ratio", 0.25)`` -> ``d["replay"]["ratio"] = 0.25``."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def base_recipe(settings: dict[str, Any], *, run_dir: Path, shards: str, tokenizer: Path,
                eval_sets: dict[str, str], seed: int) -> dict[str, Any]:
    """The recipe every run shares; variants only override keys of it.

    The pre-training keeps a reservoir buffer (ratio 0: nothing is replayed, every block is
    stored with its top-k logits) and computes an EWC Fisher at its end (no penalty before the
    first Fisher exists), so neither changes its weights, and every variant inherits both.
    """
    return {
        "model": {"init": "scratch", "tokenizer": str(tokenizer), "arch": dict(settings["arch"])},
        "data": {"shards": [shards], "block_size": settings["block_size"]},
        "batch": {"policy": "fixed", "size": settings["batch"], "micro_batch": settings["batch"]},
        "replay": {"policy": "reservoir", "ratio": 0.0, "capacity": 1_000_000, "store_logits_topk": 16},
        "regularize": {"method": "ewc", "strength": 1.0},
        "optim": {"lr": settings["lr"], "warmup_steps": settings["warmup"], "schedule": "cosine", "min_lr_ratio": 0.1},
        "run": {"dir": str(run_dir), "seed": seed, "checkpoint_every": 100_000, "keep_checkpoints": 1,
                "progress": False},
        "eval": {"sets": eval_sets, "max_tokens": settings["eval_max_tokens"], "batch_size": 16},
    }


def variant_recipe(base: dict[str, Any], variant: Variant, *, run_dir: Path, shards: str) -> dict[str, Any]:
    recipe = copy.deepcopy(base)
    # Continual increments: no replay, no distillation, no penalty unless the variant asks.
    recipe["replay"] = {"policy": "none"}
    recipe["regularize"] = {"method": "none"}
    recipe["data"]["shards"] = [shards]
    recipe["run"]["dir"] = str(run_dir)
    overrides = dict(variant.overrides)
    if overrides.get("replay.policy", "none") != "none":
        # Same buffer settings as the pre-training so its snapshot loads.
        recipe["replay"] = {"policy": "reservoir", "capacity": 1_000_000, "store_logits_topk": 16}
    if overrides.get("regularize.method") == "ewc":
        recipe["regularize"] = {"method": "ewc"}
    for key, value in overrides.items():
        set_dotted(recipe, key, value)
    return recipe


def replayed_per_step(ratio: float, batch: int) -> float:
    """What the engine replays per step on average (``Trainer._replay_share`` rounds
    ``ratio * batch`` stochastically, so the mean is exact)."""
    return min(batch - 1.0, ratio * batch) if ratio > 0 else 0.0


def new_token_budget(domain_tokens: int, ratio: float, batch: int, block: int) -> int:
    """New-data tokens a compute-equivalent replay run can train on in naive's step count."""
    steps = math.ceil(math.ceil(domain_tokens / block) / batch)
    return round(steps * (batch - replayed_per_step(ratio, batch)) * block)


# ---------------------------------------------------------------------------- data


def build_data(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    out = work / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(out), "--offline-only",
                    "--shards-per-domain", str(settings["shards_per_domain"]), "--shard-kb", str(settings["shard_kb"]),
                    "--eval-kb", str(settings["eval_kb"]), "--force"], check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    for domain in manifest["domains"]:
        domain["train"] = [str(out / p) for p in domain["train"]]
        domain["eval"] = str(out / domain["eval"])
    return manifest


def read_docs(paths: list[str]) -> list[str]:
    docs = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            docs.extend(json.loads(line)["text"] for line in handle if line.strip())
    return docs


def write_shard(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    tmp.replace(path)


def prefix_within(docs: list[str], lengths: list[int], budget: int) -> list[str]:
    """The longest prefix of ``docs`` whose packed size (tokens + one EOS each) fits ``budget``."""
    kept, total = [], 0
    for doc, n in zip(docs, lengths, strict=True):
        if total + n + 1 > budget:
            break
        kept.append(doc)
        total += n + 1
    return kept


# ---------------------------------------------------------------------------- measures


def combined_matrix(start: dict[str, float], engine_matrix: dict[str, Any], trained: list[str]) -> ContinualMatrix:
    """Row 0 = the random initial model, then one row per increment (``trained[i]`` for row i + 1).

    The engine writes row 0 itself (label ``start``) since b51bfb0; for matrices without it the
    script's own evaluation of the initial model (``start``) is put in front. Only the eval
    domains (``start``'s keys) are kept: the engine adds a column for a trained domain without an
    eval set (the union's mixed shard), always empty.
    """
    columns = list(engine_matrix["domains"])
    rows = list(engine_matrix["rows"])
    labels = engine_matrix.get("row_labels") or []
    matrix = ContinualMatrix()
    if labels[:1] == ["start"]:
        first, rows = rows[0], rows[1:]
        start = {d: v for d, v in zip(columns, first, strict=True) if d in start and v is not None}
    matrix.add_row("start", None, dict(start))
    for i, row in enumerate(rows):
        values = {d: v for d, v in zip(columns, row, strict=True) if v is not None and d in start}
        matrix.add_row(f"inc {i + 1}", trained[i], values)
    return matrix


def run_measures(matrix: ContinualMatrix, compute_tokens: int, seconds: float) -> dict[str, Any]:
    """Per-seed numbers for one variant, from its full matrix (start, pre-training, increments)."""
    summary = matrix.summary()
    final = len(matrix.rows) - 1
    new_domains = [d for d in dict.fromkeys(matrix.trained_domain_per_row[2:]) if d]
    # Plasticity: the loss on each continual domain right after the increment that trained it.
    new_loss = statistics.fmean(matrix.value(matrix.trained_rows(d)[-1], d) for d in new_domains)
    return {
        "final": {d: matrix.value(final, d) for d in matrix.domains},
        "forgetting": dict(summary["forgetting"]),
        "mean_forgetting": summary["mean_forgetting"],
        "mean_loss": summary["average_final_loss"],
        "new_domain_loss": new_loss,
        "compute_tokens": compute_tokens,
        "seconds": seconds,
        "matrix": matrix.to_json(),
    }


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one seed)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Mean ± spread over seeds of every measure, plus the ratios vs naive and vs union."""
    agg: dict[str, dict[str, Any]] = {}
    for name, runs in per_seed.items():
        domains = list(runs[0]["final"])
        forgotten = list(runs[0]["forgetting"])
        agg[name] = {
            "seeds": len(runs),
            "final": {d: mean_spread([r["final"][d] for r in runs]) for d in domains},
            "forgetting": {d: mean_spread([r["forgetting"][d] for r in runs]) for d in forgotten},
            "mean_forgetting": mean_spread([r["mean_forgetting"] for r in runs]),
            "mean_loss": mean_spread([r["mean_loss"] for r in runs]),
            "new_domain_loss": mean_spread([r["new_domain_loss"] for r in runs]),
            "compute_tokens": mean_spread([float(r["compute_tokens"]) for r in runs]),
            "seconds": sum(r["seconds"] for r in runs),
        }
    naive, union = agg.get("naive"), agg.get("union")
    for row in agg.values():
        if naive is not None:
            f0, n0 = naive["mean_forgetting"][0], naive["new_domain_loss"][0]
            row["forgetting_reduction_pct"] = 100.0 * (f0 - row["mean_forgetting"][0]) / f0 if f0 > 0 else None
            row["new_domain_change_pct"] = 100.0 * (row["new_domain_loss"][0] - n0) / n0
        if union is not None:
            row["mean_loss_vs_union"] = row["mean_loss"][0] / union["mean_loss"][0]
            row["compute_vs_union"] = row["compute_tokens"][0] / union["compute_tokens"][0]
    return agg


def check_targets(agg: dict[str, dict[str, Any]], best: str = "best") -> list[dict[str, Any]]:
    """The targets of issues #4 and #6; a target whose variants were not run is 'n/a'."""
    def have(*names: str) -> bool:
        return all(n in agg for n in names)

    def get(name: str, key: str) -> Any:
        value = agg[name][key]
        return value[0] if isinstance(value, tuple) else value

    out: list[dict[str, Any]] = []

    def add(target: str, needs: tuple[str, ...], ok: Any, detail: Any) -> None:
        if not have(*needs):
            out.append({"target": target, "result": "n/a", "detail": f"needs variants {', '.join(needs)}"})
            return
        try:
            passed, text = bool(ok()), detail()
        except TypeError:  # a ratio is undefined: naive forgot nothing (cut vs naive has no meaning)
            passed, text = False, "undefined: naive training forgot nothing"
        out.append({"target": target, "result": "PASS" if passed else "FAIL", "detail": text})

    chain = ("naive", "replay5", "replay25", "replay50")
    add("forgetting strictly decreases 0 -> 5 -> 25 -> 50% replay", chain,
        lambda: all(get(a, "mean_forgetting") > get(b, "mean_forgetting") for a, b in zip(chain, chain[1:], strict=False)),
        lambda: " > ".join(f"{get(n, 'mean_forgetting'):+.4f}" for n in chain))
    add("replay 25%: forgetting cut >= 60% vs naive, new-domain loss <= +2%", ("naive", "replay25"),
        lambda: get("replay25", "forgetting_reduction_pct") >= 60 and get("replay25", "new_domain_change_pct") <= 2,
        lambda: f"cut {get('replay25', 'forgetting_reduction_pct'):.1f}%, new-domain {get('replay25', 'new_domain_change_pct'):+.2f}%")
    add("replay 50%: mean loss within 1% of union", ("replay50", "union"),
        lambda: abs(get("replay50", "mean_loss_vs_union") - 1) <= 0.01,
        lambda: f"{get('replay50', 'mean_loss_vs_union'):.4f}x union")
    add(f"{best}: forgetting cut >= 80%, new-domain <= +2%, mean loss <= 1.01x union at <= 50% of its compute",
        ("naive", "union", best),
        lambda: (get(best, "forgetting_reduction_pct") >= 80 and get(best, "new_domain_change_pct") <= 2
                 and get(best, "mean_loss_vs_union") <= 1.01 and get(best, "compute_vs_union") <= 0.5),
        lambda: (f"cut {get(best, 'forgetting_reduction_pct'):.1f}%, new-domain {get(best, 'new_domain_change_pct'):+.2f}%, "
                 f"{get(best, 'mean_loss_vs_union'):.4f}x union loss, {get(best, 'compute_vs_union'):.2f}x union compute"))
    return out


# ---------------------------------------------------------------------------- table


def _ms(value: tuple[float, float], fmt: str = ".3f", signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value[0]:{sign}{fmt}} ± {value[1]:{fmt}}"


def table_rows(agg: dict[str, dict[str, Any]], domains: list[str]) -> tuple[list[str], list[list[str]]]:
    forgotten = domains[:-1]
    header = (["variant"] + [f"final {d}" for d in domains] + [f"forget {d}" for d in forgotten]
              + ["mean loss", "new-dom loss", "tokens", "forget cut vs naive", "new-dom vs naive",
                 "loss / union", "compute / union"])
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1f}%"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = []
    for name, row in agg.items():
        rows.append(
            [VARIANTS[name].label if name in VARIANTS else name]
            + [_ms(row["final"][d]) for d in domains]
            + [_ms(row["forgetting"][d], signed=True) if d in row["forgetting"] else "-" for d in forgotten]
            + [_ms(row["mean_loss"]), _ms(row["new_domain_loss"]), f"{row['compute_tokens'][0] / 1e3:,.0f}k",
               pct(row.get("forgetting_reduction_pct")), pct(row.get("new_domain_change_pct")),
               ratio(row.get("mean_loss_vs_union")), ratio(row.get("compute_vs_union"))]
        )
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_report(agg: dict[str, dict[str, Any]], domains: list[str], targets: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=250)
    header, rows = table_rows(agg, domains)
    table = Table(title="Forgetting benchmark (held-out loss, mean ± std over seeds; forgetting = final - best earlier)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for t in targets:
        colour = {"PASS": "green", "FAIL": "red"}.get(t["result"], "yellow")
        console.print(f"[{colour}]{t['result']}[/] {t['target']}: {t['detail']}")


def write_docs(path: Path, section: str) -> None:
    """Replace (or append) the ``## Forgetting`` section, keeping every other section."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "## Forgetting"), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section.rstrip("\n") + "\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "\n".join(lines[:start] + section.rstrip("\n").splitlines() + ([""] + lines[end:] if end < len(lines) else [])) + "\n"
    path.write_text(new, encoding="utf-8")


def docs_section(agg: dict[str, dict[str, Any]], domains: list[str], targets: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    header, rows = table_rows(agg, domains)
    s = meta["settings"]
    arch = ", ".join(f"{k} {v}" for k, v in s["arch"].items())
    lines = [
        "## Forgetting",
        "",
        f"`{meta['command']}` — {meta['date']}, 2 CPU cores (shared), {meta['minutes']:.1f} min, seeds {meta['seeds']}.",
        "",
        f"Settings: demo stream {' -> '.join(domains)} (`build_demo_data.py --shards-per-domain {s['shards_per_domain']} "
        f"--shard-kb {s['shard_kb']} --eval-kb {s['eval_kb']}`); model `{arch}`, block {s['block_size']}, "
        f"batch {s['batch']}, AdamW lr {s['lr']} cosine (warm-up {s['warmup']}), one pass per increment; one "
        f"tokenizer trained on the union of the domains' training text and shared by every run (`model.tokenizer`). "
        f"The model is pre-trained from scratch on `{domains[0]}` (one increment); every variant continues a copy of "
        "that run directory (same weights, optimiser state, replay buffer holding every pre-training block with "
        "its top-k logits, EWC Fisher) through the other domains, one increment each. Replay variants are "
        "compute-equivalent (same batch, same steps): they train on the first (batch - replayed)/batch of each "
        "new domain. Union retraining trains from the pre-trained checkpoint on all data so far, shuffled, at "
        "every increment; its compute is the sum of those retrainings. Compute = tokens trained after "
        "pre-training (new + replayed). Forgetting = final loss minus the best earlier loss since the domain was "
        "learned (`ContinualMatrix`); new-domain loss = loss on each continual domain right after its increment, "
        "averaged. Loss is nats/token on held-out text.",
        "",
        markdown_table(header, rows),
        "",
    ]
    lines += [f"- **{t['result']}** {t['target']}: {t['detail']}" for t in targets]
    notes = meta.get("notes") or []
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- running


class Bench:
    """Builds the shared data, tokenizer and pre-training per seed, then runs each variant."""

    def __init__(self, work: Path, settings: dict[str, Any], verbose: bool = True) -> None:
        self.work = work
        self.settings = settings
        self.verbose = verbose
        self.manifest = build_data(work, settings)
        self.domains = [d["name"] for d in self.manifest["domains"]]
        self.eval_sets = {d["name"]: d["eval"] for d in self.manifest["domains"]}
        self.docs = {d["name"]: read_docs(d["train"]) for d in self.manifest["domains"]}
        self.tokenizer_dir = work / "tokenizer"
        self.tokenizer = self._build_tokenizer()
        self.doc_tokens = {name: [len(ids) for ids in self.tokenizer(docs, add_special_tokens=False)["input_ids"]]
                           for name, docs in self.docs.items()}

    def say(self, message: str) -> None:
        if self.verbose:
            print(message, flush=True)

    def _build_tokenizer(self) -> Any:
        from olm_cli.modeling import train_tokenizer

        shards = [Path(p) for d in self.manifest["domains"] for p in d["train"]]
        chars = sum(len(doc) for docs in self.docs.values() for doc in docs)
        tokenizer = train_tokenizer(shards, "text", self.settings["arch"]["vocab_size"], chars + 1)
        tokenizer.save_pretrained(self.tokenizer_dir)
        return tokenizer

    def base(self, seed: int, run_dir: Path, shards: str) -> dict[str, Any]:
        return base_recipe(self.settings, run_dir=run_dir, shards=shards, tokenizer=self.tokenizer_dir,
                           eval_sets=self.eval_sets, seed=seed)

    def _train(self, recipe: dict[str, Any]) -> Any:
        from olm_cli.increment import run_increment
        from olm_cli.recipe import recipe_from_dict

        outcome = run_increment(recipe_from_dict(recipe))
        if outcome.status != "increment_complete":
            raise RuntimeError(f"{recipe['run']['dir']}: {outcome.status} {outcome.message}")
        return outcome

    def start_losses(self, seed: int) -> dict[str, float]:
        """Row 0 of every matrix: the randomly initialised model the pre-training starts from."""
        from olm_cli.evaluation.domains import evaluate_domains
        from olm_cli.modeling import build_scratch_model
        from olm_cli.recipe import recipe_from_dict

        recipe = recipe_from_dict(self.base(seed, self.work / "unused", "unused"))
        model = build_scratch_model(recipe.model, self.tokenizer, seed)
        results = evaluate_domains(model, self.tokenizer, self.eval_sets, block_size=self.settings["block_size"],
                                   max_tokens=self.settings["eval_max_tokens"], batch_size=16)
        return {d: r["loss"] for d, r in results.items()}

    def pretrain(self, seed: int) -> Path:
        seed_dir = self.work / f"seed{seed}"
        shutil.rmtree(seed_dir, ignore_errors=True)  # a reused --work starts over
        run_dir = seed_dir / "pretrain"
        stream = seed_dir / "pretrain-stream"
        first = self.domains[0]
        write_shard(stream / f"00-{first}" / "shard.jsonl", self.docs[first])
        t0 = time.perf_counter()
        outcome = self._train(self.base(seed, run_dir, str(stream / "*" / "*.jsonl")))
        self.say(f"seed {seed}: pre-trained on {first}: {outcome.steps} steps, {outcome.tokens:,} tokens, "
                 f"{time.perf_counter() - t0:.0f}s")
        return run_dir

    def run_variant(self, variant: Variant, seed: int, pretrain_dir: Path, start: dict[str, float]) -> dict[str, Any]:
        seed_dir = self.work / f"seed{seed}"
        t0 = time.perf_counter()
        compute = 0
        continual = self.domains[1:]
        if variant.union:
            losses: list[dict[str, Any]] = []
            for i, domain in enumerate(continual, start=2):
                run_dir = seed_dir / f"{variant.name}-{i}"
                stream = seed_dir / f"{variant.name}-{i}-stream"
                shutil.rmtree(run_dir, ignore_errors=True)
                shutil.copytree(pretrain_dir, run_dir, symlinks=True)
                docs = [doc for d in self.domains[:i] for doc in self.docs[d]]
                random.Random(f"{seed}:{i}").shuffle(docs)
                write_shard(stream / "00-union" / "shard.jsonl", docs)
                recipe = variant_recipe(self.base(seed, run_dir, ""), variant, run_dir=run_dir,
                                        shards=str(stream / "*" / "*.jsonl"))
                compute += self._train(recipe).tokens
                engine = json.loads((run_dir / "eval" / "matrix.json").read_text(encoding="utf-8"))
                losses.append(engine)
                self.say(f"seed {seed}: {variant.name} through {domain} done ({time.perf_counter() - t0:.0f}s)")
            # Pre-training row from the first retraining's matrix, then each retraining's last row.
            labels = losses[0]["row_labels"]
            keep = 2 if labels[:1] == ["start"] else 1  # start (if the engine wrote it) and pre-training
            rows = {"domains": losses[0]["domains"], "row_labels": labels[:keep] + [f"union {d}" for d in continual],
                    "rows": losses[0]["rows"][:keep] + [m["rows"][-1] for m in losses]}
            matrix = combined_matrix(start, rows, self.domains)
        else:
            run_dir = seed_dir / variant.name
            stream = seed_dir / f"{variant.name}-stream"
            shutil.rmtree(run_dir, ignore_errors=True)
            shutil.copytree(pretrain_dir, run_dir, symlinks=True)
            s = self.settings
            for i, domain in enumerate(continual, start=1):
                docs = self.docs[domain]
                if variant.replay_ratio > 0:
                    budget = new_token_budget(sum(n + 1 for n in self.doc_tokens[domain]), variant.replay_ratio,
                                              s["batch"], s["block_size"])
                    docs = prefix_within(docs, self.doc_tokens[domain], budget)
                write_shard(stream / f"{i:02d}-{domain}" / "shard.jsonl", docs)
                recipe = variant_recipe(self.base(seed, run_dir, ""), variant, run_dir=run_dir,
                                        shards=str(stream / "*" / "*.jsonl"))
                outcome = self._train(recipe)
                compute += outcome.tokens
                self.say(f"seed {seed}: {variant.name} through {domain}: {outcome.steps} steps, "
                         f"{outcome.tokens:,} tokens ({time.perf_counter() - t0:.0f}s)")
            engine = json.loads((run_dir / "eval" / "matrix.json").read_text(encoding="utf-8"))
            matrix = combined_matrix(start, engine, self.domains)
        return run_measures(matrix, compute, time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: python scripts/bench_forgetting.py --out results.json")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated run.seed values (default 0,1,2)")
    parser.add_argument("--variants", default=",".join(n for n in VARIANTS if n not in OPT_IN),
                        help=f"comma-separated subset of: {', '.join(VARIANTS)} (default all but {', '.join(OPT_IN)})")
    parser.add_argument("--shuffle-buffer", type=int, default=64,
                        help="data.shuffle_buffer (blocks) of the 'shuffle' variant (default 64)")
    parser.add_argument("--smoke", action="store_true", help="very small data and model, one seed, ~1 minute")
    parser.add_argument("--out", type=Path, help="write every measure, per seed and aggregated, as JSON")
    parser.add_argument("--docs", type=Path, help="write the table under '## Forgetting' in this markdown file")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, deleted)")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    import torch

    logging.disable(logging.WARNING)
    # One thread: on 2 cores shared with other jobs, 2 threads measured ~8x slower per step.
    torch.set_num_threads(1)
    settings = SMOKE if args.smoke else FULL
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.smoke and args.seeds == "0,1,2":
        seeds = [0]
    names = args.variants.split(",")
    VARIANTS["shuffle"] = Variant("shuffle", f"naive + shuffle buffer {args.shuffle_buffer}",
                                  {"data.shuffle_buffer": args.shuffle_buffer})
    # Naive first (the reference of the "vs naive" ratios), then the order of VARIANTS.
    names = sorted(names, key=lambda n: (n != "naive", list(VARIANTS).index(n)))
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="olm-bench-forgetting-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        bench = Bench(work, settings)
        per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for seed in seeds:
            start = bench.start_losses(seed)
            pretrain = bench.pretrain(seed)
            for name in names:
                per_seed[name].append(bench.run_variant(VARIANTS[name], seed, pretrain, start))
                if args.out:  # partial results survive an interrupted run
                    args.out.write_text(json.dumps({"partial": True, "per_seed": per_seed}, indent=1) + "\n", encoding="utf-8")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    agg = aggregate(per_seed)
    targets = check_targets(agg)
    print_report(agg, bench.domains, targets)
    minutes = (time.perf_counter() - started) / 60
    print(f"total {minutes:.1f} min")
    notes: list[str] = []
    command = "python scripts/bench_forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "date": date.today().isoformat(), "minutes": minutes, "seeds": seeds,
            "settings": settings, "variants": names, "notes": notes}
    if args.out:
        payload = {"meta": meta, "domains": bench.domains, "per_seed": per_seed,
                   "aggregate": {n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                                 for n, row in agg.items()},
                   "targets": targets}
        args.out.write_text(json.dumps(payload, indent=1, default=list) + "\n", encoding="utf-8")
    if args.docs:
        write_docs(args.docs, docs_section(agg, bench.domains, targets, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
