"""What ``olm status --run DIR [--json]`` reports, read straight from the run directory.

Status is read-only and never takes the lock, so it is safe to run while training (and
from monitoring scripts). It reports problems it finds (a corrupt ledger, a broken
checkpoint) in ``problems`` instead of failing: a status command that crashes on exactly
the runs that need attention would be useless.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from olm_cli.errors import CheckpointError, OlmError
from olm_cli.rundir.checkpoint import CheckpointManager, read_manifest, step_of
from olm_cli.rundir.ledger import LEDGER_FILENAME, ShardLedger, ShardStatus
from olm_cli.rundir.lock import read_holder

_TAIL_BLOCK = 8192


def last_json_line(path: Path, accept: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """The last complete JSON object in a JSON-lines file (the last ``accept`` takes), reading only its tail.

    metrics.jsonl grows by a line per step for months; reading it whole to show one line
    would make ``olm status`` slow exactly on the runs that matter. A torn last line (a
    writer mid-append) is skipped in favour of the one before it.
    """
    try:
        fh = open(path, "rb")
    except OSError:
        return None
    with fh:
        end = fh.seek(0, os.SEEK_END)
        buffer = b""
        pos = end
        while pos > 0:
            step = min(_TAIL_BLOCK, pos)
            pos -= step
            fh.seek(pos)
            buffer = fh.read(step) + buffer
            lines = buffer.split(b"\n")
            # lines[0] may be cut unless we reached the start of the file.
            complete = lines if pos == 0 else lines[1:]
            for raw in reversed(complete):
                value = _json_object(raw)
                if value is not None and (accept is None or accept(value)):
                    return value
            if len(buffer) > 64 * _TAIL_BLOCK and len(lines) > 2:
                return None  # many lines and none parse: give up rather than read it all
    return None


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """Every complete JSON object of a JSON-lines log, oldest first; ``[]`` when it is missing.

    The logs olm appends to (metrics, eval and release history) can end in a line torn by a
    crash, and a resumed run's metrics rewrite may leave one too: such lines, and anything that
    is not an object, are skipped rather than failing whoever reads the log.
    """
    rows: list[dict[str, Any]] = []
    try:
        fh = open(path, "rb")
    except OSError:
        return rows
    with fh:
        for raw in fh:
            value = _json_object(raw)
            if value is not None:
                rows.append(value)
    return rows


def _json_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object on one log line; None for a blank, torn or non-object line."""
    if not raw.strip():
        return None
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def collect_status(run_dir: Path) -> dict[str, Any]:
    """Everything ``olm status`` shows, as JSON-ready data (``--json`` prints it as is)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise OlmError(f"run directory {run_dir} does not exist")
    problems: list[str] = []

    shards = {s.value: 0 for s in ShardStatus}
    tokens = 0
    increments = 0
    try:
        ledger = ShardLedger.load(run_dir / LEDGER_FILENAME)
        shards, tokens, increments = ledger.counts(), ledger.total_tokens, ledger.increment
    except CheckpointError as exc:
        problems.append(str(exc))

    last_checkpoint = None
    choice = CheckpointManager(run_dir / "checkpoints").resolve_latest()
    problems.extend(choice.warnings)
    if choice.path is not None:
        created = None
        try:
            created = read_manifest(choice.path).get("created")
        except CheckpointError:
            pass  # verified a moment ago; a race with pruning is not worth a problem line
        last_checkpoint = {
            "step": step_of(choice.path),
            "created": created,
            "path": str(choice.path.resolve()),
        }

    # Imported here: olm_cli.release imports olm_cli.rundir, whose __init__ imports this module.
    from olm_cli.release import release_status

    releases = release_status(run_dir)
    problems.extend(releases["problems"])

    from olm_cli.rundir.schedule_status import schedule_status

    try:
        schedule = schedule_status(run_dir, choice.path, problems)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # a hand-edited log: a problem line, not a crash
        schedule = None
        problems.append(f"the schedule's files cannot be read ({type(exc).__name__}: {exc}); the schedule is not shown")
    holder = read_holder(run_dir)
    return {
        "run_dir": str(run_dir.resolve()),
        "increments": increments,
        "shards": shards,
        "tokens_trained": tokens,
        "last_checkpoint": last_checkpoint,
        "release": releases["release"],
        "last_gate": releases["last_gate"],
        "last_eval": last_json_line(run_dir / "eval" / "history.jsonl"),
        "last_metrics": last_json_line(run_dir / "metrics.jsonl"),
        "schedule": schedule,
        "lock": holder.to_dict() if holder else None,
        "problems": problems,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _status_rows(status: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(label, lines) pairs: what both the table and the plain log form show."""
    lock = status.get("lock")
    rows = [
        ("state", [f"[yellow]running[/]: pid {lock['pid']} on {lock['host']} since {lock['started']}" if lock else "idle"]),
        ("increments", [str(status["increments"])]),
        ("tokens trained", [f"{status['tokens_trained']:,}"]),
        ("shards", [", ".join(f"{k} {v}" for k, v in status["shards"].items() if v) or "none"]),
    ]
    ckpt = status.get("last_checkpoint")
    rows.append(("last checkpoint", [f"step {ckpt['step']} ({ckpt['created']})", escape(ckpt["path"])] if ckpt else ["none"]))
    rows.extend(_release_rows(status))
    from olm_cli.rundir.schedule_status import schedule_rows

    rows.extend(schedule_rows(status.get("schedule"), running=lock is not None))
    evaluation = status.get("last_eval")
    if evaluation:
        when = f"after increment {evaluation.get('increment')} (step {evaluation.get('step')})"
        if "downstream" in evaluation:  # a row of `olm eval --tasks`
            scores = "  ".join(f"{task} {metric} {value:.4f}" for task, metrics in evaluation["downstream"].items()
                               for metric, value in metrics.items() if "_stderr" not in metric)
            rows.append(("last eval", [when, f"downstream: {scores}"]))
        else:
            losses = "  ".join(f"{name} {r['loss']:.4f}" for name, r in evaluation.get("domains", {}).items())
            rows.append(("last eval", [when, f"loss: {losses}"]))
    else:
        rows.append(("last eval", ["none"]))
    metrics = status.get("last_metrics")
    shown = ("step", "increment", "phase", "cooldown_step", "loss", "lr", "tokens", "tokens_per_s", "domain",
             "batch_size")
    rows.append((
        "last metrics",
        ["  ".join(f"{k}={_fmt(metrics[k])}" for k in shown if k in metrics) if metrics else "none"],
    ))
    return rows


def _release_rows(status: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """What serving reads (``releases/latest``) and the last gate verdict, with its reasons."""
    release = status.get("release")
    rows = [(
        "release",
        [f"{release['name']} (increment {release['increment']}, step {release['step']}, {release['dtype']})",
         escape(release["path"])] if release else ["none"],
    )]
    gate = status.get("last_gate")
    if gate:
        verdict = "released" if gate.get("released") else "[red]not released[/]: " + escape("; ".join(gate.get("reasons", [])))
        rows.append(("last gate", [f"increment {gate.get('increment')} {verdict}"]))
    return rows


def render_status(status: dict[str, Any], console: Console) -> None:
    """Human view of :func:`collect_status`'s data.

    A table on a terminal, where long paths fold onto the next line rather than being cut
    with an ellipsis. Elsewhere (cron mail, a log file) one ``label: value`` line per row, so
    that every path stays whole on one line and ``grep`` finds it.
    """
    rows = _status_rows(status)
    if console.is_terminal:
        table = Table(title=f"olm run {escape(status['run_dir'])}", show_header=False, title_justify="left")
        table.add_column(style="bold", no_wrap=True)
        table.add_column(overflow="fold")
        for label, lines in rows:
            table.add_row(label, "\n".join(lines))
        console.print(table)
    else:
        console.print(f"olm run {status['run_dir']}", markup=False, highlight=False, soft_wrap=True)
        for label, lines in rows:
            console.print(f"[bold]{label}:[/] {'  '.join(lines)}", highlight=False, soft_wrap=True)
    for problem in status.get("problems", []):
        console.print(f"[red]problem:[/] {problem}", highlight=False, soft_wrap=True)
