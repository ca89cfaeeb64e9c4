"""Where a ``wsd`` schedule stands, and what its cooldowns and averaged releases did (``olm status``).

With ``optim.schedule: wsd`` a run is always in one of four phases: the trunk's one warm-up, the
stable (constant-rate) trunk, the cooldown branch of a finished increment (branch step ``k`` of
``n``, off trunk step ``g``), or its release pending (the branch done, eval and gate to come).
The facts come from files the run already writes, read without the lock and without loading a
model: the resolved ``recipe.yaml``, the latest checkpoint's ``trainer_state.json``, the tail
of ``metrics.jsonl`` (the branch's lines carry ``"phase": "cooldown"``), ``RUN/cooldown/``,
``cooldown-history.jsonl``, ``releases/history.jsonl`` (each release's ``origin``) and
``eval/history.jsonl``. A run with neither ``wsd`` nor ``release.merge: sma`` has no such view.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from olm_cli.rundir.checkpoint import CheckpointManager
from olm_cli.rundir.status import last_json_line, read_json_lines

PHASE = "cooldown"  # olm_cli.cooldown.PHASE (importing it would import torch)
_TRUNK_STATE = "trainer_state.json"


def _section(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    value = recipe.get(name)
    return value if isinstance(value, dict) else {}


def read_schedule_recipe(run_dir: Path, problems: list[str]) -> dict[str, Any] | None:
    """The keys of the run's resolved recipe this view needs; None when there is no recipe."""
    path = run_dir / "recipe.yaml"
    try:
        recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        problems.append(f"{path} cannot be read ({str(exc).splitlines()[0]}); the schedule is not shown")
        return None
    if not isinstance(recipe, dict):
        return None
    optim, release, evaluation = _section(recipe, "optim"), _section(recipe, "release"), _section(recipe, "eval")
    return {
        "schedule": optim.get("schedule", "cosine"),
        "lr": optim.get("lr"),
        "warmup_steps": int(optim.get("warmup_steps") or 0),
        "cooldown_fraction": optim.get("cooldown_fraction"),
        "cooldown_shape": optim.get("cooldown_shape"),
        "min_lr_ratio": optim.get("min_lr_ratio"),
        "merge": release.get("merge", "none"),
        "merge_last": release.get("merge_last"),
        "release_enabled": bool(release.get("enabled", True)),
        "evaluates": bool(evaluation.get("after_increment", True) and evaluation.get("sets")),
    }


def _trunk_state(checkpoint: Path | None) -> dict[str, Any]:
    if checkpoint is None:
        return {}
    try:
        state = json.loads((checkpoint / _TRUNK_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def _branch_checkpoint(run_dir: Path) -> dict[str, Any] | None:
    """The cooldown branch's newest checkpoint state (``RUN/cooldown/step-N/cooldown_state.json``)."""
    for path in reversed(CheckpointManager(run_dir / "cooldown").list()):
        try:
            state = json.loads((path / "cooldown_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(state, dict):
            return state
    return None


def _by_increment(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The last row per increment (a re-done attempt replaces an earlier one)."""
    found: dict[int, dict[str, Any]] = {}
    for row in rows:
        if isinstance(row.get("increment"), int):
            found[int(row["increment"])] = row
    return found


def _cooldown_steps(increment_steps: int, fraction: Any) -> int | None:
    # olm_cli.schedule.cooldown_steps, without importing the training stack.
    if not isinstance(fraction, int | float) or increment_steps <= 0:
        return None
    return max(1, round(increment_steps * fraction))


def release_eval(run_dir: Path, release: dict[str, Any] | None, increment: int,
                 evaluations: list[dict[str, Any]] | None = None) -> dict[str, dict[str, float | None]]:
    """Per domain: the released model's held-out loss, the trunk's before its cooldown/average, and the change.

    ``evaluations`` are the rows of ``eval/history.jsonl`` when the caller has read them already.
    """
    trunk = ((release or {}).get("origin") or {}).get("trunk_eval") or {}
    if evaluations is None:
        evaluations = read_json_lines(run_dir / "eval" / "history.jsonl")
    rows = [r for r in evaluations if r.get("increment") == increment and isinstance(r.get("domains"), dict)]
    released = {name: r.get("loss") for name, r in rows[-1]["domains"].items() if isinstance(r, dict)} if rows else {}
    table: dict[str, dict[str, float | None]] = {}
    for name in list(released) + [n for n in trunk if n not in released]:
        mine, theirs = released.get(name), trunk.get(name)
        change = mine - theirs if isinstance(mine, int | float) and isinstance(theirs, int | float) else None
        table[name] = {"release": mine, "trunk": theirs, "change": change}
    return table


def schedule_status(run_dir: Path, checkpoint: Path | None, problems: list[str]) -> dict[str, Any] | None:
    """``olm status``'s ``schedule``: the phase, trunk vs branch step, the last cooldown and SMA release.

    ``checkpoint`` is the trunk's latest checkpoint (None before the first). None for a run
    whose recipe has neither ``optim.schedule: wsd`` nor ``release.merge: sma``.
    """
    recipe = read_schedule_recipe(run_dir, problems)
    if recipe is None or (recipe["schedule"] != "wsd" and recipe["merge"] != "sma"):
        return None
    wsd = recipe["schedule"] == "wsd"
    state = _trunk_state(checkpoint)
    increment = int(state.get("increment") or 0)
    complete = bool(state.get("increment_complete")) and increment > 0
    trunk_row = last_json_line(run_dir / "metrics.jsonl", lambda row: row.get("phase") is None
                               and not row.get("skipped") and isinstance(row.get("step"), int))
    trunk_step = max(int(state.get("global_step") or 0), int(trunk_row["step"]) if trunk_row else 0)
    history = _by_increment(read_json_lines(run_dir / "cooldown-history.jsonl"))
    releases = read_json_lines(run_dir / "releases" / "history.jsonl")
    released = _by_increment(releases)

    branch = None
    if wsd:
        saved = _branch_checkpoint(run_dir)
        row = last_json_line(run_dir / "metrics.jsonl", lambda r: r.get("phase") == PHASE)
        live = row if row is not None and int(row.get("increment") or 0) not in history else None
        if live is not None or saved is not None:
            source = live or saved or {}
            inc = int(source.get("increment") or 0)
            done = max(int(live["cooldown_step"]) if live else 0,
                       int(saved["step"]) if saved and saved.get("increment") == inc else 0)
            branch = {
                "increment": inc,
                "trunk": source.get("trunk"),
                "step": done,
                "steps": (live or {}).get("cooldown_steps") or (saved or {}).get("steps"),
                "checkpointed_step": int(saved["step"]) if saved and saved.get("increment") == inc else None,
                "loss": live.get("loss") if live else (saved or {}).get("last_loss"),
                "lr": live.get("lr") if live else None,
            }

    phase = None
    if recipe["release_enabled"]:
        done = increment in released
    elif wsd:  # nothing is released: the branch's end (only trained when something evaluates it) is the mark
        done = increment in history or not recipe["evaluates"]
    else:
        done = not recipe["evaluates"] or increment in _by_increment(read_json_lines(run_dir / "eval" / "history.jsonl"))
    pending = complete and not done
    if pending and wsd and branch is None and increment in history:
        phase = "release pending"
    elif pending and wsd:
        phase = "cooldown"
        if branch is None:  # the trunk's increment is checkpointed; its branch has not logged a step yet
            branch = {"increment": increment, "trunk": checkpoint.name if checkpoint else None, "step": 0,
                      "steps": _cooldown_steps(int(state.get("step") or 0), recipe["cooldown_fraction"]),
                      "checkpointed_step": None, "loss": None, "lr": None}
    elif pending:
        phase = "release pending"
    elif wsd:
        phase = "warm-up" if trunk_step < recipe["warmup_steps"] else "stable"
    if phase != "cooldown":
        branch = None  # a branch row of an increment whose release is out (or a stale one) is history

    last_cooldown = None
    if history:
        inc, row = max(history.items())
        release = released.get(inc)
        last_cooldown = {**{key: row.get(key) for key in ("increment", "trunk", "steps", "step", "tokens", "seconds",
                                                          "first_loss", "last_loss")},
                         "release": _release_view(release), "eval": release_eval(run_dir, release, inc)}
    last_sma = None
    averaged = [r for r in releases if ((r.get("origin") or {}).get("averaged")) is not None]
    if averaged:
        row = averaged[-1]
        inc = int(row.get("increment") or 0)
        last_sma = {"increment": inc, "merge_last": recipe["merge_last"], "averaged": row["origin"]["averaged"],
                    "release": _release_view(row), "eval": release_eval(run_dir, row, inc)}
    return {
        "schedule": recipe["schedule"],
        "merge": recipe["merge"],
        "phase": phase,
        "warmup_steps": recipe["warmup_steps"] if wsd else None,
        "trunk_step": trunk_step,
        "trunk_increment": increment,
        "branch": branch,
        "last_cooldown": last_cooldown,
        "last_sma": last_sma,
    }


def _release_view(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    origin = row.get("origin") or {}
    return {"name": row.get("release"), "released": row.get("released"), "reasons": row.get("reasons") or [],
            "kind": origin.get("kind", "trunk")}


def _number(value: Any, fmt: str) -> str:
    """``value`` formatted, or ``-`` where a hand-edited or older file lacks it."""
    return format(value, fmt) if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def _losses(table: dict[str, dict[str, float | None]]) -> str:
    parts = []
    for name, entry in table.items():
        mine, trunk, change = entry["release"], entry["trunk"], entry["change"]
        text = f"{name} {_number(mine, '.4f')}"
        if trunk is not None:
            text += f" (trunk {_number(trunk, '.4f')}" + (f", {change:+.4f})" if change is not None else ")")
        parts.append(text)
    return "  ".join(parts)


def schedule_rows(view: dict[str, Any] | None, running: bool) -> list[tuple[str, list[str]]]:
    """``olm status``'s lines for :func:`schedule_status` (none for a run without wsd or sma)."""
    if not view:
        return []
    rows: list[tuple[str, list[str]]] = []
    phase, branch = view["phase"], view["branch"]
    if view["schedule"] == "wsd":
        if phase == "warm-up":
            text = f"wsd, warm-up (trunk step {view['trunk_step']} of {view['warmup_steps']})"
        elif phase == "cooldown" and branch is not None:
            text = f"wsd, cooldown {branch['step']} of {branch['steps']} steps (increment {branch['increment']})"
            if branch.get("checkpointed_step") is not None and branch["checkpointed_step"] != branch["step"]:
                text += f", checkpointed at {branch['checkpointed_step']}"
            if not running:
                text += "; the next olm train finishes it"
        elif phase == "release pending":
            text = f"wsd, release pending (increment {view['trunk_increment']}: cooldown done, eval and release next)"
        else:
            text = "wsd, stable (the trunk at the constant rate)"
        if view["merge"] == "sma":
            text += "; releases average the last trunk checkpoints"
        rows.append(("schedule", [text]))
        trunk = f"trunk step {view['trunk_step']}"
        if branch is not None:
            lr = f", lr {branch['lr']:.2e}" if isinstance(branch.get("lr"), float) else ""
            trunk += f"; branch step {branch['step']}/{branch['steps']} off {branch['trunk']}{lr}"
        rows.append(("trunk / branch", [trunk]))
    elif phase == "release pending":
        rows.append(("schedule", [f"release pending (increment {view['trunk_increment']}: SMA, eval and release next)"]))
    last = view["last_cooldown"]
    if last:
        release = last["release"]
        verdict = "not released yet" if release is None else (
            f"{release['name']} released" if release["released"] else f"{release['name']} [red]not released[/]")
        losses = f", train loss {_number(last.get('first_loss'), '.4f')} → {_number(last.get('last_loss'), '.4f')}"
        lines = [f"increment {last['increment']}: {last['steps']} steps off {last['trunk'] or '-'}, "
                 f"{_number(last.get('tokens'), ',')} tokens, {_number(last.get('seconds'), '.1f')} s{losses}; "
                 f"{verdict}"]
        if last["eval"]:
            lines.append(f"eval: {_losses(last['eval'])}")
        rows.append(("last cooldown", lines))
    sma = view["last_sma"]
    if sma:
        release = sma["release"]
        lines = [f"{release['name']} (increment {sma['increment']}) = average of {len(sma['averaged'])}: "
                 f"{', '.join(sma['averaged'])}"]
        if sma["eval"] and not last:
            lines.append(f"eval: {_losses(sma['eval'])}")
        rows.append(("last SMA", lines))
    return rows
