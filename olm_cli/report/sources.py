"""Everything ``olm report`` shows, read from a run directory into JSON-ready data.

Kept apart from the rendering so that ``--json`` and the tests see exactly the numbers the
figures are drawn from, and so that gathering never imports matplotlib. Every source is read
through its own reader (the ledger, the continual-learning matrix, the replay snapshot reader,
``olm status``); a source that is missing is an empty section, and one that cannot be read is a
line in ``problems``, never a failure: a report is most wanted for runs in trouble.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from olm_cli.errors import OlmError
from olm_cli.rundir.checkpoint import CheckpointManager, step_of, verify_checkpoint
from olm_cli.rundir.ledger import LEDGER_FILENAME, ShardLedger
from olm_cli.rundir.schedule_status import PHASE, read_schedule_recipe, release_eval
from olm_cli.rundir.status import collect_status, read_json_lines

REPORT_FORMAT = 1
METRICS_FILE = "metrics.jsonl"
# olm_cli.evaluation.domains names these too, but importing it imports torch, which a report
# does not need (tests/test_report.py checks that the names agree).
MATRIX_FILE = Path("eval") / "matrix.json"
HISTORY_FILE = Path("eval") / "history.jsonl"
TRAINER_STATE = "trainer_state.json"
# Points per series in the figures and in report.json: a run of months logs a line per step,
# and a figure a few hundred pixels wide shows no more. Every increment keeps its last point.
MAX_POINTS = 4000
MAX_COOLDOWN_POINTS = 500  # per cooldown branch (its first and last points always kept)
# The keys of an eval history row that are its coordinates or the held-out losses the matrix
# already shows; every other number in a row (a downstream task's accuracy ...) is an extra metric.
_HISTORY_COORDINATES = {"increment", "step", "time"}
_DOMAIN_FIELDS = {"loss", "perplexity", "tokens"}


def gather(run_dir: Path, *, previous: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report's data for ``run_dir``.

    ``previous`` is the data of the report written before into the same place: the replay
    buffer's composition per increment is read from checkpoints, which are pruned, so the
    increments whose checkpoints are gone keep the composition the earlier report saw.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OlmError(f"run directory {run_dir} does not exist")
    if not (run_dir / "recipe.yaml").exists() and not (run_dir / METRICS_FILE).exists():
        raise OlmError(f"{run_dir}: not an olm run directory (no recipe.yaml); run `olm train` first")
    problems: list[str] = []
    status = collect_status(run_dir)
    problems.extend(status.get("problems", []))
    metrics = read_json_lines(run_dir / METRICS_FILE)
    releases = read_json_lines(run_dir / "releases" / "history.jsonl")
    return {
        "format": REPORT_FORMAT,
        "run_dir": status["run_dir"],
        "status": {key: status.get(key) for key in ("increments", "shards", "tokens_trained", "last_checkpoint",
                                                     "release", "lock", "schedule")},
        "training": training_series(metrics),
        "increments": increment_summary(metrics),
        "cooldowns": cooldown_section(run_dir, metrics, releases, problems),
        "eval": eval_section(run_dir, problems),
        "ledger": ledger_section(run_dir, problems),
        "replay": replay_section(run_dir, metrics, previous, problems),
        "releases": releases,
        "problems": problems,
    }


# --------------------------------------------------------------------------- training


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _thin(indices: list[int], increments: list[int], limit: int) -> list[int]:
    """At most about ``limit`` of ``indices``: every k-th, plus the last of every increment."""
    if len(indices) <= limit:
        return indices
    stride = math.ceil(len(indices) / limit)
    keep = set(indices[::stride])
    for position, index in enumerate(indices):
        if position + 1 == len(indices) or increments[position + 1] != increments[position]:
            keep.add(index)
    return sorted(keep)


def trunk_rows(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The trunk's lines of ``metrics.jsonl``: a cooldown branch's (``"phase": "cooldown"``) are drawn apart."""
    return [row for row in metrics if row.get("phase") is None]


def training_series(metrics: list[dict[str, Any]], limit: int = MAX_POINTS) -> dict[str, Any]:
    """Loss, learning rate and tokens/s per logged step, and the steps whose batch was skipped.

    A skipped batch (non-finite loss or gradients) never reached the weights: it is listed with
    its reason, not drawn as a point of the loss curve.
    """
    metrics = trunk_rows(metrics)
    steps = [row for row in metrics if not row.get("skipped") and isinstance(row.get("step"), int)]
    skipped = [{"step": row.get("step"), "increment": row.get("increment"), "reason": row.get("reason")}
               for row in metrics if row.get("skipped")]
    kept = _thin(list(range(len(steps))), [int(row.get("increment") or 0) for row in steps], limit)
    rows = [steps[i] for i in kept]
    return {
        "logged_steps": len(steps),
        "shown_steps": len(rows),
        "step": [int(row["step"]) for row in rows],
        "increment": [int(row.get("increment") or 0) for row in rows],
        "loss": [_number(row.get("loss")) for row in rows],
        "lr": [_number(row.get("lr")) for row in rows],
        "tokens_per_s": [_number(row.get("tokens_per_s")) for row in rows],
        "skipped": skipped,
    }


def increment_summary(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per increment seen in the metrics: steps, last loss, speed, replay share, skips."""
    by_increment: dict[int, list[dict[str, Any]]] = {}
    for row in trunk_rows(metrics):
        if isinstance(row.get("increment"), int):
            by_increment.setdefault(int(row["increment"]), []).append(row)
    summary = []
    for increment, rows in sorted(by_increment.items()):
        trained = [row for row in rows if not row.get("skipped")]
        losses = [v for v in (_number(row.get("loss")) for row in trained) if v is not None]
        rates = [v for v in (_number(row.get("tokens_per_s")) for row in trained) if v is not None]
        samples = sum(int(row.get("batch_size") or 0) for row in trained)
        replayed = sum(int(row.get("replayed") or 0) for row in trained)
        tail = losses[-max(1, len(losses) // 10):]
        steps = [int(row["step"]) for row in rows if isinstance(row.get("step"), int)]
        summary.append({
            "increment": increment,
            "first_step": min(steps, default=None),
            "last_step": max(steps, default=None),
            "logged_steps": len(trained),
            "skipped_steps": len(rows) - len(trained),
            "final_loss": sum(tail) / len(tail) if tail else None,
            "tokens_per_s": sum(rates) / len(rates) if rates else None,
            "replay_share": replayed / samples if samples else None,
            "replayed_samples": replayed,
            "samples": samples,
        })
    return summary


# --------------------------------------------------------------------------- cooldowns


def _trunk_step(name: Any) -> int | None:
    try:
        return step_of(Path(str(name)))
    except ValueError:
        return None


def _recipe_lr(recipe: dict[str, Any] | None, steps: int) -> list[float | None]:
    """The branch's rate at each step, from the recipe (a run older than the branch's metrics lines)."""
    from olm_cli.schedule import COOLDOWN_SHAPES, cooldown_multiplier

    lr, shape, floor = (recipe or {}).get("lr"), (recipe or {}).get("cooldown_shape"), (recipe or {}).get("min_lr_ratio")
    if not isinstance(lr, int | float) or shape not in COOLDOWN_SHAPES or not isinstance(floor, int | float):
        return [None] * steps
    return [float(lr) * cooldown_multiplier(i, steps, shape=shape, min_ratio=float(floor)) for i in range(steps)]


def cooldown_section(run_dir: Path, metrics: list[dict[str, Any]], releases: list[dict[str, Any]],
                     problems: list[str]) -> list[dict[str, Any]]:
    """One entry per cooldown branch (``optim.schedule: wsd``): its span on the trunk's step axis and curves.

    A branch of increment ``i`` starts at the trunk step ``g`` it branched off and runs ``n``
    steps of its own, drawn at ``g + 1 .. g + n``. Its loss and rate come from its metrics lines;
    for a run that logged none, its rate follows from the recipe (the schedule is a pure function)
    and its loss is the first and last of ``cooldown-history.jsonl``. A branch with lines but no
    history row is in progress, or was killed: ``complete`` is false and the span ends where it got.
    """
    rows: dict[int, list[dict[str, Any]]] = {}
    for row in metrics:
        if row.get("phase") == PHASE and isinstance(row.get("increment"), int) and isinstance(row.get("cooldown_step"), int):
            rows.setdefault(int(row["increment"]), []).append(row)
    history: dict[int, dict[str, Any]] = {}
    for row in read_json_lines(run_dir / "cooldown-history.jsonl"):
        if isinstance(row.get("increment"), int):
            history[int(row["increment"])] = row
    if not rows and not history:
        return []
    recipe = read_schedule_recipe(run_dir, problems)
    by_release = {int(r["increment"]): r for r in releases if isinstance(r.get("increment"), int)}
    evaluations = read_json_lines(run_dir / HISTORY_FILE)
    spans = []
    for increment in sorted(set(rows) | set(history)):
        logged = sorted(rows.get(increment, []), key=lambda r: int(r["cooldown_step"]))
        done = history.get(increment)
        trunk = (done or {}).get("trunk") or (logged[-1].get("trunk") if logged else None)
        start = _trunk_step(trunk)
        if start is None and logged and isinstance(logged[0].get("step"), int):
            start = int(logged[0]["step"])
        if start is None:
            continue
        steps = int((done or {}).get("steps") or (logged[-1].get("cooldown_steps") if logged else 0) or 0)
        lr_source: str | None = "metrics"
        if logged:
            shown = [logged[i] for i in _thin(list(range(len(logged))), [0] * len(logged), MAX_COOLDOWN_POINTS)]
            at = [int(r["cooldown_step"]) for r in shown]
            losses, lrs = [_number(r.get("loss")) for r in shown], [_number(r.get("lr")) for r in shown]
        else:
            at, lrs = list(range(1, steps + 1)), _recipe_lr(recipe, steps)
            ends = {1: (done or {}).get("first_loss"), steps: (done or {}).get("last_loss")}
            losses = [_number(ends.get(k)) for k in at]
            lr_source = "recipe" if any(v is not None for v in lrs) else None
        reached = int((done or {}).get("step") or (logged[-1]["cooldown_step"] if logged else 0))
        release = by_release.get(increment)
        origin = (release or {}).get("origin") or {}
        spans.append({
            "increment": increment,
            "trunk": trunk,
            "from_step": start,
            "to_step": start + reached,
            "steps": steps,
            "done_steps": reached,
            "complete": done is not None,
            "tokens": (done or {}).get("tokens", logged[-1].get("cooldown_tokens") if logged else None),
            "seconds": (done or {}).get("seconds"),
            "first_loss": _number((done or {}).get("first_loss", logged[0].get("loss") if logged else None)),
            "last_loss": _number((done or {}).get("last_loss", logged[-1].get("loss") if logged else None)),
            "lr_source": lr_source,
            "step": [start + k for k in at],
            "cooldown_step": at,
            "loss": losses,
            "lr": lrs,
            "release": (release or {}).get("release"),
            "released": (release or {}).get("released"),
            "release_kind": origin.get("kind"),
            "averaged": origin.get("averaged"),
            "eval": release_eval(run_dir, release, increment, evaluations) if release else {},
        })
    return spans


# --------------------------------------------------------------------------- evaluation


def _extra_metrics(row: dict[str, Any]) -> dict[str, float]:
    """Every finite number of an eval history row except its coordinates and the domain losses."""
    found: dict[str, float] = {}

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, [*path, str(key)])
            return
        number = _number(node)
        if number is None or not path:
            return
        if len(path) == 1 and path[0] in _HISTORY_COORDINATES:
            return
        if len(path) == 3 and path[0] == "domains" and path[2] in _DOMAIN_FIELDS:
            return
        found["/".join(path)] = number

    walk(row, [])
    return found


def eval_section(run_dir: Path, problems: list[str]) -> dict[str, Any]:
    """The continual-learning matrix with its summary, and any other metric the eval history holds."""
    from olm_cli.evaluation.matrix import ContinualMatrix

    matrix = None
    path = run_dir / MATRIX_FILE
    if path.exists():
        try:
            matrix = ContinualMatrix.from_json(path).to_json()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problems.append(f"{path} cannot be read ({exc}); the eval figures are left out")
    history = read_json_lines(run_dir / HISTORY_FILE)
    extra: dict[str, list[dict[str, Any]]] = {}
    for row in history:
        for name, value in _extra_metrics(row).items():
            extra.setdefault(name, []).append({"increment": row.get("increment"), "step": row.get("step"),
                                               "value": value})
    return {"matrix": matrix, "evaluations": len(history), "extra_metrics": extra}


# --------------------------------------------------------------------------- ledger


def ledger_section(run_dir: Path, problems: list[str]) -> dict[str, Any]:
    """The shard ledger: every shard with its status, tokens and reason; tokens per increment."""
    try:
        ledger = ShardLedger.load(run_dir / LEDGER_FILENAME)
    except OlmError as exc:
        problems.append(str(exc))
        return {"shards": [], "counts": {}, "tokens": 0, "tokens_per_increment": {}}
    shards = [{key: entry.to_dict().get(key) for key in ("path", "status", "tokens", "increment", "reason",
                                                         "first_seen", "finished_at")}
              for entry in ledger.entries]
    per_increment: dict[str, dict[str, int]] = {}
    for shard in shards:
        if shard["increment"] is not None and shard["tokens"]:
            bucket = per_increment.setdefault(str(shard["increment"]), {})
            status = str(shard["status"])
            bucket[status] = bucket.get(status, 0) + int(shard["tokens"])
    return {"shards": shards, "counts": ledger.counts(), "tokens": ledger.total_tokens,
            "tokens_per_increment": dict(sorted(per_increment.items(), key=lambda item: int(item[0])))}


# --------------------------------------------------------------------------- replay


def _checkpoint_increments(run_dir: Path) -> Iterable[tuple[int, bool, Path]]:
    """(increment, complete, path) of every checkpoint that verifies (cheaply: sizes only)."""
    for path in CheckpointManager(run_dir / "checkpoints").list():
        try:
            verify_checkpoint(path)
            state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (OlmError, OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("increment"), int):
            yield int(state["increment"]), bool(state.get("increment_complete", True)), path


def replay_section(run_dir: Path, metrics: list[dict[str, Any]], previous: dict[str, Any] | None,
                   problems: list[str]) -> dict[str, Any]:
    """Replay share of the trained samples per increment, and the buffer's composition after each.

    The composition comes from the newest checkpoint of each increment still on disk (its
    replay snapshot), else from ``previous`` (an earlier report, which saw it before pruning).
    """
    from olm_cli.replay.inspect import summarize_replay
    from olm_cli.replay.snapshot import MANIFEST

    share = {str(row["increment"]): row["replay_share"] for row in increment_summary(metrics)
             if row["replay_share"] is not None}
    composition: dict[str, dict[str, Any]] = {}
    old = ((previous or {}).get("replay") or {}).get("composition") or {}
    if isinstance(old, dict):
        composition.update({str(k): v for k, v in old.items() if isinstance(v, dict)})
    newest: dict[int, tuple[bool, Path]] = {}
    for increment, complete, path in _checkpoint_increments(run_dir):
        newest[increment] = (complete, path)  # list() is oldest first: the last one wins
    for increment, (complete, path) in sorted(newest.items()):
        if not (path / "replay" / MANIFEST).is_file():
            continue
        try:
            summary = summarize_replay(path / "replay")
        except OlmError as exc:
            problems.append(f"replay buffer of {path.name}: {exc}")
            continue
        composition[str(increment)] = {
            "checkpoint": path.name,
            "increment_complete": complete,
            "policy": summary["policy"],
            "size": summary["size"],
            "tokens": summary["tokens"],
            "fill": summary["fill"],
            "by_domain": {row["name"]: row["samples"] for row in summary["by_domain"]},
        }
    return {"share": share, "composition": dict(sorted(composition.items(), key=lambda item: int(item[0])))}


def read_previous(path: Path) -> dict[str, Any] | None:
    """An earlier report's data, or None when there is none (or it is not one of ours)."""
    try:
        if os.path.islink(path):
            return None
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == REPORT_FORMAT else None
