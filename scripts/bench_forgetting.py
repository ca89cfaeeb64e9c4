#!/usr/bin/env python
"""Forgetting benchmark from scratch, in a regime where the base model has learned something.

A small Llama with a 512-token byte-level BPE (trained once on the union of the domains'
training text, shared by every run) is pre-trained from scratch for several epochs on the first
domain of the offline demo stream (``scripts/build_demo_data.py``: code -> prose -> drama), until
its held-out loss is well below the **unigram entropy** of its training text (the loss of a model
that ignores context). Both are printed; the benchmark's first target is a gap of >= 1.5 nats,
because a model that has only learned token frequencies has little to forget.

Every arm then continues a copy of the same pre-training run directory through the remaining
domains, one increment (:func:`olm_cli.increment.run_increment`) per domain. An arm is one row of
``ARMS``: recipe overrides (dotted keys) applied to every continual increment. An arm whose keys
the installed olm does not know (the recipe fails validation on them) is reported as
``skipped: needs <key>`` instead of failing the run, so the same script runs the full set once
those keys exist. After each increment the script evaluates the run's newest **release**
(``RUN/releases/latest``: what serving reads, so a cooled or merged release is what is measured)
on every domain's held-out set, and computes the continual-learning matrix's measures with
:class:`olm_cli.evaluation.matrix.ContinualMatrix`.

Union retraining is the reference: at every increment it trains, from the pre-trained checkpoint,
one pass over all the data seen so far (all domains' documents shuffled into one shard); its
compute is the sum of those retrainings. Compute is counted as tokens trained after pre-training
(new + replayed, as the increment reports them).

    python scripts/bench_forgetting.py --out results.json      # 3 seeds, every arm (~30 min on 2 idle cores)
    python scripts/bench_forgetting.py --quick                 # 1 seed, short base training, few arms
    python scripts/bench_forgetting.py --arms naive,replay25,union --seeds 0
    python scripts/bench_forgetting.py --json > results.json   # one JSON object on stdout, progress on stderr
    python scripts/bench_forgetting.py --list-arms             # every arm, its overrides, runnable or not
    python scripts/bench_forgetting.py --base-only --seeds 0 --work W   # the base alone and its gap
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olm_cli.evaluation.matrix import ContinualMatrix  # noqa: E402

# ---------------------------------------------------------------------------- settings

FULL: dict[str, Any] = {
    "shards_per_domain": 10,   # built per domain; the base trains on all of the first domain's
    "continual_shards": 1,     # each later domain arrives as this many shards
    "shard_kb": 40,
    "eval_kb": 16,
    "arch": {"size": "tiny", "vocab_size": 512},
    "block_size": 64,          # short blocks: twice the optimiser steps for the same tokens
    "batch": 16,
    "lr": 3e-3,
    "warmup": 20,              # the base's warm-up
    "continual_warmup": 5,     # each continual increment's (about a quarter of its steps)
    "base_epochs": 8,          # 1,568 steps: held-out code 3.71 vs unigram 5.37 (5 epochs: gap 1.43)
    "eval_max_tokens": 8_000,
}
QUICK: dict[str, Any] = {
    **FULL,
    "shards_per_domain": 3,
    "shard_kb": 24,
    "eval_kb": 8,
    "base_epochs": 2,
    "eval_max_tokens": 4_000,
}
QUICK_ARMS = "naive,replay25,wsd_equal,union"
# The base must be at least this far below the unigram entropy of its training text (nats/token).
BASE_GAP_TARGET = 1.5


@dataclass(frozen=True)
class Arm:
    """One countermeasure: recipe overrides (dotted keys) applied to every continual increment."""

    name: str
    label: str
    overrides: dict[str, Any] = field(default_factory=dict)
    union: bool = False
    # WSD at naive's compute: each increment's trunk gets a step budget so that trunk + cooldown
    # train as many steps as naive's increment did (the new data left over is carried onward).
    equal_compute: bool = False
    # A new run directory whose model is the base's release (instead of a copy of the base's run
    # directory): ``replay.seed_from`` only seeds a brand-new run, and the base's buffer of real
    # text must not be there when the replay is meant to be the model's own samples.
    from_release: bool = False
    # In the default set (no --arms). Arms measured before whose question another arm now answers
    # better stay runnable by name.
    default: bool = True

    @property
    def uses_replay(self) -> bool:
        return self.overrides.get("replay.policy", "none") != "none"


def _replay(ratio: float, **extra: Any) -> dict[str, Any]:
    return {"replay.policy": "reservoir", "replay.ratio": ratio, **extra}


# WSD: a constant LR through every increment with a cooldown branch as each increment's release
# (Singh et al. 2025, arXiv 2503.02844); SMA: the release is the mean of the last K checkpoints of
# the constant-LR trunk (Li et al. 2025, arXiv 2505.12082). The SMA arm writes a checkpoint every
# 4 steps so that K checkpoints exist within one increment.
_WSD = {"optim.schedule": "wsd", "optim.cooldown_fraction": 0.2}
# Self-generated replay: the base's own unconditional samples, one block each, stand in for the
# pre-training text a user of a pretrained model does not have.
_GENERATE = {"samples": 256, "max_new_tokens": 64, "temperature": 1.0, "top_p": 0.95, "batch_size": 32}
_SMA = {"optim.schedule": "wsd", "release.merge": "sma", "release.merge_last": 4,
        "run.checkpoint_every": 4, "run.keep_checkpoints": 4}

ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("naive", "naive cosine"),
    Arm("replay5", "replay 5% (add)", _replay(0.05)),
    Arm("replay25", "replay 25% (add)", _replay(0.25)),
    Arm("replay50", "replay 50% (add)", _replay(0.50)),
    Arm("replay5_displace", "replay 5% (displace)", _replay(0.05, **{"replay.mode": "displace"})),
    Arm("replay25_displace", "replay 25% (displace)", _replay(0.25, **{"replay.mode": "displace"})),
    Arm("replay50_displace", "replay 50% (displace)", _replay(0.50, **{"replay.mode": "displace"})),
    Arm("wsd_cooldown", "WSD + cooldown 20% (on top)", dict(_WSD), default=False),
    Arm("wsd_equal", "WSD + cooldown 20%, naive's compute", dict(_WSD), equal_compute=True),
    Arm("wsd_sma", "WSD + SMA of last 4 (+ cooldown)", dict(_SMA)),
    Arm("const_sma", "constant LR + SMA of last 4", {**_SMA, "optim.schedule": "constant"}, default=False),
    Arm("lwf", "replay 25% + LwF", _replay(0.25, **{"distill.method": "lwf"})),
    Arm("reptile", "Reptile meta-update", {"optim.meta": {"method": "reptile"}}),
    Arm("selfgen", "replay 25% of self-generated samples",
        _replay(0.25, **{"replay.seed_from": "generate", "replay.generate": dict(_GENERATE)}), from_release=True),
    # Exploration on seed 0 around the best combination (docs/forgetting.md), run by name.
    Arm("lwf_displace15", "replay 15% (displace) + LwF", _replay(0.15, **{"replay.mode": "displace", "distill.method": "lwf"}),
        default=False),
    Arm("lwf_add10", "replay 10% (add) + LwF", _replay(0.10, **{"distill.method": "lwf"}), default=False),
    # The combination aimed at the union targets (configs/forgetting-scratch.yaml): replay that
    # keeps naive's step budget (the displaced new text is trained in the next increment), and
    # LwF on the new text. Chosen on seed 0 over 15/35/50% displaced, 10% added, LwF alpha 0.3/0.7.
    Arm("best", "best: replay 25% (displace) + LwF", _replay(0.25, **{"replay.mode": "displace", "distill.method": "lwf"})),
    Arm("union", "union retraining", union=True),
]}


# ---------------------------------------------------------------------------- recipes


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "replay.ratio", 0.25)`` -> ``d["replay"]["ratio"] = 0.25``."""
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def base_recipe(settings: dict[str, Any], *, run_dir: Path, shards: str, tokenizer: Path, seed: int) -> dict[str, Any]:
    """The recipe every run shares; arms only override keys of it.

    The pre-training keeps a reservoir buffer (ratio 0: nothing is replayed, every block is
    stored with its top-k logits), so every replay arm inherits the same buffer. The engine's own
    evaluation is off: the script evaluates each increment's release itself.
    """
    return {
        "model": {"init": "scratch", "tokenizer": str(tokenizer), "arch": dict(settings["arch"])},
        "data": {"shards": [shards], "block_size": settings["block_size"]},
        "batch": {"policy": "fixed", "size": settings["batch"], "micro_batch": settings["batch"]},
        "replay": {"policy": "reservoir", "ratio": 0.0, "capacity": 1_000_000, "store_logits_topk": 16},
        "optim": {"lr": settings["lr"], "warmup_steps": settings["warmup"], "schedule": "cosine", "min_lr_ratio": 0.1},
        "run": {"dir": str(run_dir), "seed": seed, "checkpoint_every": 100_000, "keep_checkpoints": 1,
                "progress": False},
        "eval": {"after_increment": False},
    }


def arm_recipe(base: dict[str, Any], arm: Arm, *, run_dir: Path, shards: str, warmup: int | None = None) -> dict[str, Any]:
    recipe = copy.deepcopy(base)
    # Continual increments: no replay, no distillation unless the arm asks.
    recipe["replay"] = {"policy": "none"}
    recipe["data"]["shards"] = [shards]
    recipe["run"]["dir"] = str(run_dir)
    if warmup is not None:
        recipe["optim"]["warmup_steps"] = warmup
    if arm.uses_replay:
        # Same buffer settings as the pre-training so its snapshot loads.
        recipe["replay"] = {"policy": "reservoir", "capacity": 1_000_000, "store_logits_topk": 16}
    for key, value in arm.overrides.items():
        set_dotted(recipe, key, value)
    return recipe


_PROBLEM = re.compile(r"^\s+(?P<path>[A-Za-z_][\w.]*): (?P<reason>.+)$")


def missing_keys(recipe: dict[str, Any], overrides: dict[str, Any]) -> list[str]:
    """The overridden keys the installed olm refuses (``[]``: the recipe validates).

    A problem on a key the arm does not override is a bug in the benchmark, not a missing
    feature, and is raised.
    """
    from olm_cli.errors import RecipeError
    from olm_cli.recipe import recipe_from_dict

    try:
        recipe_from_dict(recipe)
    except RecipeError as error:
        needs: list[str] = []
        for line in str(error).splitlines()[1:]:
            match = _PROBLEM.match(line)
            if not match:
                continue
            path = match["path"]
            owner = next((k for k in overrides if path == k or path.startswith(k + ".") or k.startswith(path + ".")), None)
            if owner is None:
                raise
            shown = f"{owner}={overrides[owner]}" if isinstance(overrides[owner], str) else owner
            if shown not in needs:
                needs.append(shown)
        if not needs:
            raise
        return needs
    return []


def unigram_entropy(token_ids: list[list[int]], eos_id: int) -> float:
    """Entropy (nats/token) of the token frequencies, one EOS after each document: the loss of
    the best model that ignores context, measured on the text it would be trained on."""
    counts: Counter[int] = Counter()
    for ids in token_ids:
        counts.update(ids)
        counts[eos_id] += 1
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def equal_compute_trunk_steps(naive_steps: int, cooldown_fraction: float) -> int:
    """The most trunk steps ``T`` whose cooldown branch (``max(1, round(T * fraction))`` steps, as
    :func:`olm_cli.schedule.cooldown_steps` sizes it) still fits with them in ``naive_steps``."""
    from olm_cli.schedule import cooldown_steps

    trunk = max(1, math.floor(naive_steps / (1 + cooldown_fraction)))
    while trunk > 1 and trunk + cooldown_steps(trunk, cooldown_fraction) > naive_steps:
        trunk -= 1
    while trunk + 1 + cooldown_steps(trunk + 1, cooldown_fraction) <= naive_steps:
        trunk += 1
    return trunk


def cooldown_tokens(run_dir: Path, increment: int) -> int:
    """Tokens a WSD cooldown branch trained at the end of ``increment`` (its release's compute,
    which the increment's own token count leaves out); 0 without a cooldown."""
    path = run_dir / "cooldown-history.jsonl"  # written by olm_cli/cooldown.py, one line per cooldown
    if not path.is_file():
        return 0
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return sum(int(r.get("tokens", 0)) for r in rows if r.get("increment") == increment)


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
    docs: list[str] = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            docs.extend(json.loads(line)["text"] for line in handle if line.strip())
    return docs


def write_shard(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------- measures


def run_measures(matrix: ContinualMatrix, compute_tokens: int, seconds: float) -> dict[str, Any]:
    """Per-seed numbers for one arm, from its full matrix (start, pre-training, increments)."""
    summary = matrix.summary()
    final = len(matrix.rows) - 1
    new_domains = [d for d in dict.fromkeys(matrix.trained_domain_per_row[2:]) if d]
    # Plasticity: the loss on each continual domain right after the increment that trained it.
    right_after = {d: matrix.value(matrix.trained_rows(d)[-1], d) for d in new_domains}
    if any(v is None for v in right_after.values()):
        raise RuntimeError(f"a continual domain was not evaluated after its increment: {right_after}")
    new_loss = statistics.fmean(v for v in right_after.values() if v is not None)
    return {
        "final": {d: matrix.value(final, d) for d in matrix.domains},
        "forgetting": dict(summary["forgetting"]),
        "mean_forgetting": summary["mean_forgetting"],
        "bwt": summary.get("bwt"),
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
        if not runs:
            continue
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
            row["compute_vs_naive"] = row["compute_tokens"][0] / naive["compute_tokens"][0]
        if union is not None:
            row["mean_loss_vs_union"] = row["mean_loss"][0] / union["mean_loss"][0]
            row["compute_vs_union"] = row["compute_tokens"][0] / union["compute_tokens"][0]
    return agg


def check_targets(agg: dict[str, dict[str, Any]], base: list[dict[str, float]], skipped: dict[str, list[str]],
                  best: str = "best") -> list[dict[str, Any]]:
    """One entry per target (result PASS, FAIL or n/a with the reason), in a fixed order.

    ``base`` holds, per seed, the base model's held-out loss and unigram entropy on its domain.
    """
    out: list[dict[str, Any]] = []

    def get(name: str, key: str) -> Any:
        value = agg[name][key]
        return value[0] if isinstance(value, tuple) else value

    def add(target: str, needs: tuple[str, ...], ok: Any, detail: Any) -> None:
        absent = [n for n in needs if n not in agg]
        if absent:
            why = "; ".join(f"{n} skipped: needs {', '.join(skipped[n])}" if n in skipped else f"{n} not run"
                            for n in absent)
            out.append({"target": target, "result": "n/a", "detail": why})
            return
        try:
            passed, text = bool(ok()), detail()
        except TypeError:  # a ratio is undefined: naive forgot nothing
            out.append({"target": target, "result": "FAIL", "detail": "naive forgot nothing: a cut vs naive is undefined"})
            return
        out.append({"target": target, "result": "PASS" if passed else "FAIL", "detail": text})

    if base:
        gaps = [b["unigram_entropy"] - b["loss"] for b in base]
        out.append({
            "target": f"base learned: held-out loss >= {BASE_GAP_TARGET} nats below the unigram entropy of its training text",
            "result": "PASS" if min(gaps) >= BASE_GAP_TARGET else "FAIL",
            "detail": "; ".join(f"seed {b['seed']}: loss {b['loss']:.3f} vs unigram {b['unigram_entropy']:.3f} "
                                f"(gap {b['unigram_entropy'] - b['loss']:.3f})" for b in base),
        })
    add(f"{best}: forgetting cut >= 80% vs naive", ("naive", best),
        lambda: get(best, "forgetting_reduction_pct") >= 80,
        lambda: f"cut {get(best, 'forgetting_reduction_pct'):.1f}%")
    add(f"{best}: new-domain loss <= +2% vs naive", ("naive", best),
        lambda: get(best, "new_domain_change_pct") <= 2,
        lambda: f"{get(best, 'new_domain_change_pct'):+.2f}%")
    add(f"{best}: mean loss <= 1.01x union retraining", ("union", best),
        lambda: get(best, "mean_loss_vs_union") <= 1.01,
        lambda: f"{get(best, 'mean_loss_vs_union'):.4f}x")
    add(f"{best}: compute <= 50% of union retraining", ("union", best),
        lambda: get(best, "compute_vs_union") <= 0.5,
        lambda: f"{get(best, 'compute_vs_union'):.3f}x")
    chain = ("naive", "replay5", "replay25", "replay50")
    add("forgetting strictly decreases with replay 0 -> 5 -> 25 -> 50% (add)", chain,
        lambda: all(get(a, "mean_forgetting") > get(b, "mean_forgetting") for a, b in zip(chain, chain[1:], strict=False)),
        lambda: " > ".join(f"{get(n, 'mean_forgetting'):+.4f}" for n in chain))
    # The literature's claim (arXiv 2503.02844): at equal compute, WSD's cooled releases beat
    # re-warmed cosine. Compute is only equal when the cooldown's tokens are within 5% of naive's.
    add("WSD + cooldown beats repeated cosine (mean loss and forgetting) at equal compute (within 5%)",
        ("naive", "wsd_equal"),
        lambda: (get("wsd_equal", "mean_loss") < get("naive", "mean_loss")
                 and get("wsd_equal", "mean_forgetting") < get("naive", "mean_forgetting")
                 and abs(get("wsd_equal", "compute_vs_naive") - 1) <= 0.05),
        lambda: (f"mean loss {get('wsd_equal', 'mean_loss'):.4f} vs {get('naive', 'mean_loss'):.4f}, forgetting "
                 f"{get('wsd_equal', 'mean_forgetting'):+.4f} vs {get('naive', 'mean_forgetting'):+.4f}, compute "
                 f"{get('wsd_equal', 'compute_vs_naive'):.3f}x naive"))
    return out


# ---------------------------------------------------------------------------- table


def _ms(value: tuple[float, float], fmt: str = ".3f", signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{value[0]:{sign}{fmt}} ± {value[1]:{fmt}}"


def table_rows(agg: dict[str, dict[str, Any]], domains: list[str], skipped: dict[str, list[str]] | None = None
               ) -> tuple[list[str], list[list[str]]]:
    forgotten = domains[:-1]
    header = (["arm"] + [f"final {d}" for d in domains] + [f"forget {d}" for d in forgotten]
              + ["mean loss", "new-dom loss", "tokens", "forget cut vs naive", "new-dom vs naive",
                 "loss / union", "compute / union"])

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:+.1f}%"

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = []
    most = max((row["seeds"] for row in agg.values()), default=0)
    for name, row in agg.items():
        label = ARMS[name].label if name in ARMS else name
        if row["seeds"] < most:  # merged results files: say which rows rest on fewer seeds
            label += f" ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
        rows.append(
            [label]
            + [_ms(row["final"][d]) for d in domains]
            + [_ms(row["forgetting"][d], signed=True) if d in row["forgetting"] else "-" for d in forgotten]
            + [_ms(row["mean_loss"]), _ms(row["new_domain_loss"]), f"{row['compute_tokens'][0] / 1e3:,.0f}k",
               pct(row.get("forgetting_reduction_pct")), pct(row.get("new_domain_change_pct")),
               ratio(row.get("mean_loss_vs_union")), ratio(row.get("compute_vs_union"))]
        )
    for name, needs in (skipped or {}).items():
        label = ARMS[name].label if name in ARMS else name
        rows.append([label, f"skipped: needs {', '.join(needs)}"] + [""] * (len(header) - 2))
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def print_report(agg: dict[str, dict[str, Any]], domains: list[str], targets: list[dict[str, Any]],
                 skipped: dict[str, list[str]], file: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=250, file=file)
    header, rows = table_rows(agg, domains, skipped)
    table = Table(title="Forgetting benchmark (held-out loss of each release, mean ± std over seeds; "
                        "forgetting = final - best earlier)")
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for t in targets:
        colour = {"PASS": "green", "FAIL": "red"}.get(t["result"], "yellow")
        console.print(f"[{colour}]{t['result']}[/] {t['target']}: {t['detail']}")


def docs_section(agg: dict[str, dict[str, Any]], domains: list[str], targets: list[dict[str, Any]],
                 skipped: dict[str, list[str]], meta: dict[str, Any]) -> str:
    """The measured table as markdown, for docs/forgetting.md."""
    header, rows = table_rows(agg, domains, skipped)
    s = meta["settings"]
    arch = ", ".join(f"{k} {v}" for k, v in s["arch"].items())
    lines = [
        f"`{meta['command']}` — {meta['date']}, 2 CPU cores (shared), {meta['minutes']:.1f} min, seeds {meta['seeds']}.",
        "",
        f"Settings: demo stream {' -> '.join(domains)} (`build_demo_data.py --shards-per-domain {s['shards_per_domain']} "
        f"--shard-kb {s['shard_kb']} --eval-kb {s['eval_kb']}`); model `{arch}`, block {s['block_size']}, batch "
        f"{s['batch']}, AdamW lr {s['lr']}; base: {s['base_epochs']} epochs of `{domains[0]}` (cosine); each "
        "continual increment one pass over its domain.",
        "",
        markdown_table(header, rows),
        "",
    ]
    lines += [f"- **{t['result']}** {t['target']}: {t['detail']}" for t in targets]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- running


def latest_release(run_dir: Path) -> Path:
    """The run's newest release folder (what serving loads); an error if there is none or the gate refused it."""
    releases = sorted(p for p in (run_dir / "releases").glob("release-*") if p.is_dir())
    if not releases:
        raise RuntimeError(f"{run_dir}: the increment wrote no release")
    info = json.loads((releases[-1] / "release.json").read_text(encoding="utf-8"))
    if not info.get("released", True):
        raise RuntimeError(f"{releases[-1]}: release refused by the gate: {info.get('reasons')}")
    return releases[-1]


class Bench:
    """Builds the shared data and tokenizer, the base model per seed, then runs each arm."""

    def __init__(self, work: Path, settings: dict[str, Any], say: Any) -> None:
        self.work = work
        self.settings = settings
        self.say = say
        self.naive_steps: dict[tuple[int, str], int] = {}  # (seed, domain) -> naive's increment steps
        self.manifest = build_data(work, settings)
        self.domains = [d["name"] for d in self.manifest["domains"]]
        self.eval_sets = {d["name"]: d["eval"] for d in self.manifest["domains"]}
        # The base trains on every shard of the first domain; a later domain arrives as its first
        # ``continual_shards`` shards, and union retraining takes that much text of every domain.
        shards = {d["name"]: [read_docs([p]) for p in d["train"]] for d in self.manifest["domains"]}
        keep = settings["continual_shards"]
        self.docs = {name: [doc for part in (parts if i == 0 else parts[:keep]) for doc in part]
                     for i, (name, parts) in enumerate(shards.items())}
        self.union_docs = {name: [doc for part in parts[:keep] for doc in part] for name, parts in shards.items()}
        self.tokenizer_dir = work / "tokenizer"
        self.tokenizer = self._build_tokenizer()
        ids = {name: self.tokenizer(docs, add_special_tokens=False)["input_ids"] for name, docs in self.docs.items()}
        self.doc_tokens = {name: [len(x) for x in v] for name, v in ids.items()}
        self.unigram = {name: unigram_entropy(v, self.tokenizer.eos_token_id) for name, v in ids.items()}

    def _build_tokenizer(self) -> Any:
        from olm_cli.modeling import train_tokenizer

        text = self.work / "tokenizer-text" / "all.jsonl"
        write_shard(text, [doc for docs in self.docs.values() for doc in docs])
        chars = sum(len(doc) for docs in self.docs.values() for doc in docs)
        tokenizer = train_tokenizer([text], "text", self.settings["arch"]["vocab_size"], chars + 1)
        tokenizer.save_pretrained(self.tokenizer_dir)
        return tokenizer

    def base(self, seed: int, run_dir: Path, shards: str) -> dict[str, Any]:
        return base_recipe(self.settings, run_dir=run_dir, shards=shards, tokenizer=self.tokenizer_dir, seed=seed)

    def _train(self, recipe: dict[str, Any]) -> Any:
        from olm_cli.increment import run_increment
        from olm_cli.recipe import recipe_from_dict

        outcome = run_increment(recipe_from_dict(recipe))
        if outcome.status != "increment_complete":
            raise RuntimeError(f"{recipe['run']['dir']}: {outcome.status} {outcome.message}")
        return outcome

    def evaluate(self, model: Any) -> dict[str, float]:
        from olm_cli.evaluation.domains import evaluate_domains

        results = evaluate_domains(model, self.tokenizer, self.eval_sets, block_size=self.settings["block_size"],
                                   max_tokens=self.settings["eval_max_tokens"], batch_size=16)
        return {d: r["loss"] for d, r in results.items()}

    def evaluate_release(self, run_dir: Path) -> dict[str, float]:
        """The held-out losses of the run's newest release: what serving would load."""
        from transformers import AutoModelForCausalLM

        return self.evaluate(AutoModelForCausalLM.from_pretrained(latest_release(run_dir)))

    def start_losses(self, seed: int) -> dict[str, float]:
        """Row 0 of every matrix: the randomly initialised model the pre-training starts from."""
        from olm_cli.modeling import build_scratch_model
        from olm_cli.recipe import recipe_from_dict

        recipe = recipe_from_dict(self.base(seed, self.work / "unused", "unused"))
        return self.evaluate(build_scratch_model(recipe.model, self.tokenizer, seed))

    def pretrain(self, seed: int, reuse: bool = False) -> tuple[Path, dict[str, float]]:
        """The base: ``base_epochs`` shuffled passes over the first domain, one cosine increment."""
        base_dir = self.work / f"base-seed{seed}"
        run_dir = base_dir / "run"
        stream = base_dir / "stream"
        first = self.domains[0]
        t0 = time.perf_counter()
        if reuse and (run_dir / "releases").is_dir():
            losses = self.evaluate_release(run_dir)
            self.say(f"seed {seed}: base reused from {run_dir}; held-out loss {losses[first]:.3f} nats/token vs unigram "
                     f"entropy {self.unigram[first]:.3f} (gap {self.unigram[first] - losses[first]:.3f})")
            return run_dir, losses
        shutil.rmtree(base_dir, ignore_errors=True)  # a reused --work starts over
        for epoch in range(self.settings["base_epochs"]):
            docs = list(self.docs[first])
            random.Random(f"{seed}:epoch{epoch}").shuffle(docs)
            write_shard(stream / f"00-{first}" / f"epoch-{epoch:02d}.jsonl", docs)
        outcome = self._train(self.base(seed, run_dir, str(stream / "*" / "*.jsonl")))
        losses = self.evaluate_release(run_dir)
        self.say(f"seed {seed}: base trained on {first} ({self.settings['base_epochs']} epochs): {outcome.steps} steps, "
                 f"{outcome.tokens:,} tokens, {time.perf_counter() - t0:.0f}s; held-out loss {losses[first]:.3f} "
                 f"nats/token vs unigram entropy of its training text {self.unigram[first]:.3f} "
                 f"(gap {self.unigram[first] - losses[first]:.3f}, target >= {BASE_GAP_TARGET})")
        return run_dir, losses

    def run_arm(self, arm: Arm, seed: int, pretrain_dir: Path, start: dict[str, float],
                base_losses: dict[str, float]) -> dict[str, Any]:
        seed_dir = self.work / f"seed{seed}"
        t0 = time.perf_counter()
        compute = 0
        matrix = ContinualMatrix()
        matrix.add_row("start", None, dict(start))
        matrix.add_row("base", self.domains[0], dict(base_losses))
        for i, domain in enumerate(self.domains[1:], start=2):
            if arm.union:
                run_dir = seed_dir / f"{arm.name}-{i}"
                stream = seed_dir / f"{arm.name}-{i}-stream"
                for stale in (run_dir, stream):  # a reused --work starts over
                    shutil.rmtree(stale, ignore_errors=True)
                shutil.copytree(pretrain_dir, run_dir, symlinks=True)
                docs = [doc for d in self.domains[:i] for doc in self.union_docs[d]]
                random.Random(f"{seed}:{i}").shuffle(docs)
                write_shard(stream / "00-union" / "shard.jsonl", docs)
            else:
                run_dir = seed_dir / arm.name
                stream = seed_dir / f"{arm.name}-stream"
                if i == 2:
                    for stale in (run_dir, stream):  # a reused --work starts over
                        shutil.rmtree(stale, ignore_errors=True)
                    if not arm.from_release:
                        shutil.copytree(pretrain_dir, run_dir, symlinks=True)
                # Each seed sees the new domain's documents in its own order.
                docs = list(self.docs[domain])
                random.Random(f"{seed}:{domain}").shuffle(docs)
                write_shard(stream / f"{i - 1:02d}-{domain}" / "shard.jsonl", docs)
            recipe = arm_recipe(self.base(seed, run_dir, ""), arm, run_dir=run_dir, shards=str(stream / "*" / "*.jsonl"),
                                warmup=self.settings["continual_warmup"])
            if arm.from_release:
                recipe["model"] = {"init": "pretrained", "name_or_path": str(latest_release(pretrain_dir)),
                                   "tokenizer": str(self.tokenizer_dir)}
            if arm.equal_compute:
                if (seed, domain) not in self.naive_steps:
                    raise RuntimeError(f"{arm.name}: its step budget is naive's; run naive first (--arms naive,{arm.name})")
                recipe["run"]["max_steps"] = equal_compute_trunk_steps(self.naive_steps[seed, domain],
                                                                       recipe["optim"]["cooldown_fraction"])
            outcome = self._train(recipe)
            if arm.name == "naive":
                self.naive_steps[seed, domain] = outcome.steps
            compute += outcome.tokens
            matrix.add_row(f"inc {i}", domain, self.evaluate_release(run_dir))
            self.say(f"seed {seed}: {arm.name} through {domain}: {outcome.steps} steps, {outcome.tokens:,} tokens "
                     f"({time.perf_counter() - t0:.0f}s)")
            if not arm.union:
                compute += cooldown_tokens(run_dir, outcome.increment)
        return run_measures(matrix, compute, time.perf_counter() - t0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Example: python scripts/bench_forgetting.py --out results.json")
    parser.add_argument("--seeds", help="comma-separated run.seed values (default 0,1,2; --quick: 0)")
    parser.add_argument("--arms", help=f"comma-separated subset of: {', '.join(ARMS)} (default all but "
                        f"{', '.join(n for n, a in ARMS.items() if not a.default)}; --quick: {QUICK_ARMS})")
    parser.add_argument("--quick", action="store_true", help="smaller data, shorter base training, one seed, four arms")
    parser.add_argument("--base-per-seed", action="store_true",
                        help="train a base model per seed (default: one base, trained with the first seed, shared)")
    parser.add_argument("--best", default="best", help="the arm the recipe targets are checked on (default best)")
    parser.add_argument("--list-arms", action="store_true", help="print every arm, its overrides and whether the installed olm runs it")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress and the table on stderr)")
    parser.add_argument("--out", type=Path, help="also write that JSON object to this file (partial results while running)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one, deleted)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="train nothing: re-aggregate results files (--out; arms of later files added), e.g. with another --best")
    parser.add_argument("--reuse-base", action="store_true",
                        help="with --work: evaluate a base already trained there instead of training it again")
    parser.add_argument("--markdown", action="store_true", help="also print the table and targets as markdown")
    parser.add_argument("--base-only", action="store_true",
                        help="train (or with --reuse-base evaluate) the base and print its gap to the unigram entropy; no arms")
    args = parser.parse_args(argv)
    args.arms_given = args.arms
    args.arms = args.arms or (QUICK_ARMS if args.quick else ",".join(n for n, a in ARMS.items() if a.default))
    args.seeds = args.seeds or ("0" if args.quick else "0,1,2")
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    needs_naive = [a for a in args.arms.split(",") if a in ARMS and ARMS[a].equal_compute]
    if needs_naive and "naive" not in args.arms.split(","):
        parser.error(f"{', '.join(needs_naive)} take naive's step budget: add naive to --arms")
    if args.best not in ARMS:
        parser.error(f"--best {args.best!r} is not an arm; choose from {', '.join(ARMS)}")
    try:
        [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def plan_arms(names: list[str], settings: dict[str, Any]) -> tuple[list[str], dict[str, list[str]]]:
    """Split the requested arms into the runnable ones and the skipped ones (with the keys they need)."""
    probe = base_recipe(settings, run_dir=Path("run"), shards="x/*.jsonl", tokenizer=Path("tok"), seed=0)
    runnable, skipped = [], {}
    for name in names:
        arm = ARMS[name]
        needs = missing_keys(arm_recipe(probe, arm, run_dir=Path("run"), shards="x/*.jsonl"), arm.overrides)
        if needs:
            skipped[name] = needs
        else:
            runnable.append(name)
    return runnable, skipped


def report(args: argparse.Namespace, say: Any) -> int:
    """Re-aggregate a results file: the table, the targets (for ``--best``) and the JSON again."""
    saved: dict[str, Any] = {}
    for path in args.report:
        try:
            part = json.loads(path.read_text(encoding="utf-8"))
            part["per_seed"], part["domains"], part["meta"]  # noqa: B018 -- the keys every results file has
        except (OSError, ValueError, KeyError, TypeError) as error:
            say(f"error: {path}: not a results file of this benchmark ({error})")
            return 2
        if not saved:
            saved = part
            continue
        saved["per_seed"].update({n: runs for n, runs in part["per_seed"].items() if n not in saved["per_seed"]})
        saved["skipped"] = {n: v for n, v in saved.get("skipped", {}).items() if n not in saved["per_seed"]}
        saved["meta"]["command"] += " ; " + part["meta"]["command"]
    per_seed, domains = saved["per_seed"], saved["domains"]
    agg = aggregate(per_seed)
    targets = check_targets(agg, saved.get("base", []), saved.get("skipped", {}), args.best)
    saved["meta"]["best"] = args.best
    saved.update({"aggregate": {n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()}
                                for n, row in agg.items()}, "targets": targets})
    print_report(agg, domains, targets, saved.get("skipped", {}), file=sys.stderr if args.json else sys.stdout)
    if args.markdown:
        say(docs_section(agg, domains, targets, saved.get("skipped", {}), saved["meta"]))
    if args.json:
        sys.stdout.write(json.dumps(saved, indent=1) + "\n")
    return 0


def run_quietly(run: Callable[[argparse.Namespace, list[str] | None], int], args: argparse.Namespace,
                argv: list[str] | None) -> int:
    """``run(args, argv)`` with library warnings off (they would drown the table); restored on
    return, as the tests call a benchmark's main() in-process."""
    import logging

    logging.disable(logging.WARNING)
    try:
        return run(args, argv)
    finally:
        logging.disable(logging.NOTSET)


def write_result(result: dict[str, Any], args: argparse.Namespace) -> None:
    """The result as JSON: to ``--out`` when given, and on stdout with ``--json``."""
    text = json.dumps(result, indent=1) + "\n"
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    if args.json:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    return run_quietly(_run, parse_args(argv), argv)


def _run(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch

    # One thread: on 2 cores shared with other jobs, 2 threads measured ~8x slower per step.
    torch.set_num_threads(1)
    log = sys.stderr if args.json else sys.stdout

    def say(message: str) -> None:
        print(message, file=log, flush=True)

    settings = QUICK if args.quick else FULL
    seeds = [int(s) for s in args.seeds.split(",")]
    # Naive first (the reference of the "vs naive" ratios), then the order of ARMS.
    names = sorted(args.arms.split(","), key=lambda n: (n != "naive", list(ARMS).index(n)))
    runnable, skipped = plan_arms(names, settings)
    if args.list_arms:
        if args.arms_given is None:  # every arm, the ones outside the default set marked
            names = list(ARMS)
            runnable, skipped = plan_arms(names, settings)
        for name in names:
            state = f"skipped: needs {', '.join(skipped[name])}" if name in skipped else "runs"
            if not ARMS[name].default:
                state += " (only by name)"
            overrides = "union retraining" if ARMS[name].union else json.dumps(ARMS[name].overrides) or "{}"
            print(f"{name:18} {state:45} {overrides}")
        return 0
    if args.report:
        return report(args, say)
    for name, needs in skipped.items():
        say(f"{name}: skipped: needs {', '.join(needs)}")
    command = "python scripts/bench_forgetting.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="olm-bench-forgetting-"))
    work.mkdir(parents=True, exist_ok=True)
    per_seed: dict[str, list[dict[str, Any]]] = {n: [] for n in runnable}
    base: list[dict[str, Any]] = []

    def payload(partial: bool) -> dict[str, Any]:
        agg = aggregate(per_seed)
        meta = {"command": command.strip(), "date": date.today().isoformat(),
                "minutes": (time.perf_counter() - started) / 60, "seeds": seeds, "settings": settings,
                "arms": {n: ("union retraining" if ARMS[n].union else ARMS[n].overrides) for n in names},
                "best": args.best}
        return {"partial": partial, "meta": meta, "domains": bench.domains, "base": base, "skipped": skipped,
                "per_seed": per_seed,
                "aggregate": {n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in row.items()} for n, row in agg.items()},
                "targets": check_targets(agg, base, skipped, args.best)}

    try:
        bench = Bench(work, settings, say)
        first = bench.domains[0]
        say("unigram entropy of each domain's training text (nats/token): "
            + ", ".join(f"{d} {h:.3f}" for d, h in bench.unigram.items()))
        for seed in seeds:
            if seed == seeds[0] or args.base_per_seed:
                start = bench.start_losses(seed)
                pretrain, base_losses = bench.pretrain(seed, reuse=args.reuse_base)
                base.append({"seed": seed, "domain": first, "loss": base_losses[first],
                             "unigram_entropy": bench.unigram[first]})
            if args.base_only:
                continue
            for name in runnable:
                per_seed[name].append(bench.run_arm(ARMS[name], seed, pretrain, start, base_losses))
                if args.out:  # partial results survive an interrupted run
                    args.out.write_text(json.dumps(payload(True), indent=1) + "\n", encoding="utf-8")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = payload(False)
    agg = aggregate(per_seed)
    print_report(agg, bench.domains, result["targets"], skipped, file=log)
    say(f"total {result['meta']['minutes']:.1f} min")
    if args.markdown:
        say(docs_section(agg, bench.domains, result["targets"], skipped, result["meta"]))
    write_result(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
