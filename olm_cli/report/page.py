"""The report as one self-contained HTML page: inline CSS, figures as base64 PNG, no script.

It opens from a file, a mail attachment or an artifact store without network access. Each
figure's ``<img>`` carries the figure's facts (``alt`` text, ``data-*`` attributes), and every
section without data says what would fill it.
"""

from __future__ import annotations

import base64
import datetime
import json
from html import escape
from pathlib import Path
from typing import Any

from olm_cli.report.figures import Figure

_LEDGER_ROWS = 200  # the page lists problem shards first, then the newest; report.json has them all
_INCREMENT_ROWS = 30  # the newest increments in the table; report.json has them all
_PROBLEM_STATUSES = ("quarantined", "changed", "skipped")

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1480px;color:#1d2330;
padding:0 16px;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#667;margin:0 0 16px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #dde;border-radius:6px;padding:8px 12px;min-width:130px}.card b{display:block;font-size:18px}
.card span{color:#667;font-size:12px}.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(640px,1fr));gap:16px}
.single figure,.single .empty{max-width:720px}figure{margin:0;border:1px solid #eef;border-radius:6px;padding:8px}figure img{width:100%;height:auto}
figcaption{color:#556;font-size:12px}.empty{color:#778;font-style:italic;border:1px dashed #ccd;border-radius:6px;
padding:14px}table{border-collapse:collapse;font-size:12px;margin:6px 0}th,td{border-bottom:1px solid #eef;
padding:3px 8px;text-align:left;vertical-align:top}td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b00020}.ok{color:#18794e}.problems{background:#fff4f4;border:1px solid #f3c7c7;border-radius:6px;
padding:8px 12px}code{font-size:12px}
"""


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(head: list[str], rows: list[list[Any]], numeric: set[int] | None = None) -> str:
    numeric = numeric or set()
    cells = "".join(f'<th{" class=n" if i in numeric else ""}>{escape(h)}</th>' for i, h in enumerate(head))
    body = []
    for row in rows:
        body.append("<tr>" + "".join(
            f'<td{" class=n" if i in numeric else ""}>{cell if isinstance(cell, _Raw) else escape(_fmt(cell))}</td>'
            for i, cell in enumerate(row)) + "</tr>")
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """HTML already escaped (a coloured verdict); table cells escape everything else."""


def _figure(figure: Figure | None, empty: str) -> str:
    if figure is None:
        return f'<div class="empty">{escape(empty)}</div>'
    meta = " ".join(f'data-{escape(key.replace("_", "-"))}="{escape(json.dumps(value))}"'
                    for key, value in figure.meta.items())
    source = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure id="fig-{figure.id}" {meta}><img src="data:image/png;base64,{source}" '
            f'alt="{escape(figure.alt)}" title="{escape(figure.alt)}"><figcaption>{escape(figure.alt)}'
            "</figcaption></figure>")


def _cards(data: dict[str, Any]) -> str:
    status = data["status"]
    shards = status.get("shards") or {}
    release = status.get("release")
    checkpoint = status.get("last_checkpoint")
    summary = (data["eval"]["matrix"] or {}).get("summary") or {}
    cards = [
        ("increments", _fmt(status.get("increments"))),
        ("tokens trained", _fmt(status.get("tokens_trained"))),
        ("shards done", _fmt(shards.get("done", 0))),
        ("quarantined", _fmt(shards.get("quarantined", 0))),
        ("last checkpoint", f"step {checkpoint['step']}" if checkpoint else "none"),
        ("serving", release["name"] if release else "no release"),
        ("mean final loss", _fmt(summary.get("average_final_loss"))),
        ("mean forgetting", _fmt(summary.get("mean_forgetting"), 3) if summary.get("mean_forgetting") is not None
         else "-"),
    ]
    schedule = status.get("schedule") or {}
    if schedule.get("phase"):
        branch = schedule.get("branch")
        phase = (f"cooldown {branch['step']}/{branch['steps']}" if schedule["phase"] == "cooldown" and branch
                 else schedule["phase"])
        cards.append(("schedule phase", phase))
    return '<div class="cards">' + "".join(
        f'<div class="card"><b>{escape(value)}</b><span>{escape(label)}</span></div>' for label, value in cards
    ) + "</div>"


def _increments_table(data: dict[str, Any]) -> str:
    rows = [[r["increment"], r["first_step"], r["last_step"], r["logged_steps"], r["skipped_steps"], r["final_loss"],
             None if r["tokens_per_s"] is None else round(r["tokens_per_s"]),
             None if r["replay_share"] is None else f"{100 * r['replay_share']:.1f}%"]
            for r in data["increments"][-_INCREMENT_ROWS:]]
    if not rows:
        return ""
    older = len(data["increments"]) - len(rows)
    note = f"<p>{older} older increments in <code>report.json</code>.</p>" if older else ""
    return note + _table(["increment", "first step", "last step", "logged steps", "skipped", "final loss (last 10%)",
                   "tokens/s", "replay share"], rows, {0, 1, 2, 3, 4, 5, 6, 7})


def _measures_table(matrix: dict[str, Any] | None) -> str:
    if not matrix or not matrix["rows"]:
        return ""
    summary = matrix["summary"]
    final = matrix["rows"][-1]
    rows = [[domain, final[i], summary["forgetting"].get(domain), summary["bwt_per_domain"].get(domain),
             summary["fwt_per_domain"].get(domain)] for i, domain in enumerate(matrix["domains"])]
    rows.append(["mean", summary["average_final_loss"], summary["mean_forgetting"], summary["bwt"], summary["fwt"]])
    return ("<p>Per-domain measures on the final row (losses: positive = worse; formulas in "
            "<code>docs/forgetting.md</code>):</p>"
            + _table(["domain", "final loss", "forgetting", "BWT", "FWT"], rows, {1, 2, 3, 4}))


def _extra_table(extra: dict[str, list[dict[str, Any]]]) -> str:
    if not extra:
        return ""
    rows = [[name, len(points), points[-1]["increment"], points[-1]["value"]] for name, points in sorted(extra.items())]
    return _table(["metric", "evaluations", "last increment", "last value"], rows, {1, 2, 3})


def _ledger_table(ledger: dict[str, Any]) -> str:
    shards = ledger["shards"]
    if not shards:
        return '<div class="empty">No shard in the ledger yet: the first <code>olm train</code> scans the data.</div>'
    problems = [s for s in shards if s["status"] in _PROBLEM_STATUSES]
    rest = sorted((s for s in shards if s["status"] not in _PROBLEM_STATUSES),
                  key=lambda s: (s["increment"] or 0, s["path"]), reverse=True)
    listed = (problems + rest)[:_LEDGER_ROWS]
    counts = ", ".join(f"{k} {v}" for k, v in ledger["counts"].items() if v)
    rows = [[s["path"], _Raw(f'<span class="bad">{escape(s["status"])}</span>') if s["status"] in _PROBLEM_STATUSES
             else s["status"], s["tokens"], s["increment"], s["finished_at"], s["reason"] or ""] for s in listed]
    more = (f"<p>{len(shards) - len(listed)} more shards in <code>report.json</code> and "
            "<code>ledger.json</code>.</p>") if len(listed) < len(shards) else ""
    return (f"<p>{len(shards)} shards ({escape(counts)}), {ledger['tokens']:,} tokens trained. Problems first.</p>"
            + _table(["shard", "status", "tokens", "increment", "finished", "reason"], rows, {2, 3}) + more)


def release_source(row: dict[str, Any]) -> str:
    """Which weights a release holds, in words: the trunk, its cooldown branch, an average of its checkpoints."""
    origin = row.get("origin") or {}
    kind = origin.get("kind")
    if not kind:
        return "trunk"
    parts = []
    if origin.get("averaged") is not None:
        parts.append(f"SMA of {len(origin['averaged'])} checkpoints")
    if isinstance(origin.get("cooldown"), dict):
        parts.append(f"cooldown of {origin['cooldown'].get('step')} steps")
    return " + ".join(parts or [str(kind)]) + f" off {origin.get('trunk')}"


def _cooldowns_table(cooldowns: list[dict[str, Any]]) -> str:
    if not cooldowns:
        return ""
    rows = []
    for c in cooldowns[-_INCREMENT_ROWS:]:
        changes = [e["change"] for e in c["eval"].values() if e.get("change") is not None]
        state = "done" if c["complete"] else _Raw('<span class="bad">unfinished</span>')
        rows.append([c["increment"], c["trunk"], f"{c['done_steps']}/{c['steps']}", state, c["tokens"],
                     c["first_loss"], c["last_loss"], c["release"] or "-",
                     sum(changes) / len(changes) if changes else None])
    return ("<p>Cooldown branches (<code>optim.schedule: wsd</code>; shaded in the figure): the release of each "
            "increment, trained off the trunk, which the next increment continues from. Eval change: the release's "
            "held-out loss minus the trunk's, mean over domains (negative: the cooldown helped).</p>"
            + _table(["increment", "off trunk", "steps", "state", "tokens", "first loss", "last loss", "release",
                      "eval change vs trunk"], rows, {0, 4, 5, 6, 8}))


def _releases_table(releases: list[dict[str, Any]]) -> str:
    if not releases:
        return ('<div class="empty">No release yet: one is published behind the gate after every completed '
                "increment (<code>release.enabled</code>).</div>")
    rows = []
    more = (f"<p>{len(releases) - _LEDGER_ROWS} older attempts in <code>releases/history.jsonl</code>.</p>"
            if len(releases) > _LEDGER_ROWS else "")
    for r in list(reversed(releases))[:_LEDGER_ROWS]:
        verdict = _Raw('<span class="ok">released</span>') if r.get("released") else _Raw(
            '<span class="bad">not released</span>')
        rows.append([r.get("release"), r.get("increment"), r.get("step"), release_source(r), verdict,
                     "; ".join(r.get("reasons") or []), r.get("previous") or "-", r.get("latest") or "-",
                     r.get("created")])
    return _table(["release", "increment", "step", "weights", "gate", "reasons", "compared with", "latest after",
                   "created"], rows, {1, 2}) + more


def _skipped_table(training: dict[str, Any]) -> str:
    skipped = training["skipped"]
    if not skipped:
        return ""
    rows = [[s["step"], s["increment"], s["reason"]] for s in skipped[:_LEDGER_ROWS]]
    return "<p>Batches skipped (never reached the weights):</p>" + _table(["step", "increment", "reason"], rows, {0, 1})


def render_page(data: dict[str, Any], figures: dict[str, Figure | None]) -> str:
    """The whole page as a string."""
    run_dir = data["run_dir"]
    created = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    matrix = data["eval"]["matrix"]
    no_eval = ("No evaluation yet: set eval.sets in the recipe; every domain is evaluated before the first "
               "increment and after each one." if not matrix else "")
    problems = ""
    if data["problems"]:
        problems = '<div class="problems"><b>Problems</b><ul>' + "".join(
            f"<li>{escape(p)}</li>" for p in data["problems"]) + "</ul></div>"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>olm report: {escape(Path(run_dir).name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>olm report: {escape(Path(run_dir).name)}</h1>",
        f'<p class="sub"><code>{escape(run_dir)}</code> &middot; generated {escape(created)} by '
        "<code>olm report</code></p>",
        problems,
        _cards(data),
        "<h2>Training</h2>",
        '<div class="grid">',
        _figure(figures["training"], "No training step logged yet: metrics.jsonl is written as olm train runs."),
        _figure(figures["replay"], "No replay yet: replay.policy is 'none', or no step has mixed in replayed samples."),
        "</div>",
        _increments_table(data),
        _cooldowns_table(data.get("cooldowns") or []),
        _skipped_table(data["training"]),
        "<h2>Evaluation and forgetting</h2>",
        '<div class="grid">',
        _figure(figures["eval"], no_eval or "No evaluation row yet."),
        _figure(figures["matrix"], no_eval or "No evaluation row yet."),
        "</div>",
        _measures_table(matrix),
    ]
    if figures["extra"] is not None or data["eval"]["extra_metrics"]:
        parts += ["<h2>Other evaluation metrics</h2>", '<div class="single">',
                  _figure(figures["extra"], "No metric with an increment."), "</div>",
                  _extra_table(data["eval"]["extra_metrics"])]
    parts += [
        "<h2>Releases and the gate</h2>",
        _releases_table(data["releases"]),
        "<h2>Shards (the ledger)</h2>",
        '<div class="single">', _figure(figures["ledger"], "No tokens counted to a shard yet."), "</div>",
        _ledger_table(data["ledger"]),
        "</body></html>",
    ]
    return "\n".join(part for part in parts if part) + "\n"
