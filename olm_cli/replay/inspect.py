"""``olm replay-inspect``: what is in the replay buffer of a run's latest checkpoint.

Reads a snapshot read-only (never the run's scratch ``RUN/replay``), so it is safe to run
while training is going on: checkpoints are immutable once ``latest`` points at them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from rich.console import Console
from rich.table import Table

from olm_cli.console import make_console
from olm_cli.errors import CheckpointError, DataError
from olm_cli.replay.snapshot import MANIFEST, SnapshotReader
from olm_cli.rundir.atomic import atomic_writer

_BAR_WIDTH = 30
_HISTOGRAM_BINS = 10
_MOST_REPLAYED = 10
_PREVIEW_CHARS = 240


class Decoder(Protocol):
    def decode(self, token_ids: list[int]) -> str: ...


def find_buffer_dir(run_dir: Path) -> Path:
    """Replay snapshot of the run's latest checkpoint.

    Also accepts a checkpoint directory or a snapshot directory itself. Without a
    ``checkpoints/latest`` link, the highest ``step-*`` checkpoint holding a snapshot is used.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a directory")
    for candidate in (run_dir, run_dir / "replay"):
        if (candidate / MANIFEST).is_file():
            return candidate
    checkpoints = run_dir / "checkpoints"
    latest = checkpoints / "latest"
    if latest.exists():
        buffer_dir = latest.resolve() / "replay"
        if (buffer_dir / MANIFEST).is_file():
            return buffer_dir
        raise DataError(
            f"the latest checkpoint of {run_dir} ({latest.resolve().name}) has no replay "
            "buffer: replay.policy is 'none' in its recipe"
        )
    steps = sorted(checkpoints.glob("step-*"), reverse=True) if checkpoints.is_dir() else []
    for step_dir in steps:
        if (step_dir / "replay" / MANIFEST).is_file():
            return step_dir / "replay"
    raise DataError(
        f"no replay buffer in {run_dir}: no checkpoint with a replay snapshot "
        "(is replay.policy 'none', or has no checkpoint been written yet?)"
    )


def _histogram(values: np.ndarray, bins: int = _HISTOGRAM_BINS) -> dict[str, list[float]]:
    if values.size == 0:
        return {"edges": [], "counts": []}
    low, high = float(values.min()), float(values.max())
    if low == high:
        high = low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _composition(
    names: np.ndarray, lengths: np.ndarray, size: int, tokens: int
) -> list[dict[str, Any]]:
    rows = []
    for name in sorted(set(names.tolist())):
        mask = names == name
        count = int(mask.sum())
        n_tokens = int(lengths[mask].sum())
        rows.append(
            {
                "name": name,
                "samples": count,
                "tokens": n_tokens,
                "share": count / size if size else 0.0,
                "token_share": n_tokens / tokens if tokens else 0.0,
            }
        )
    rows.sort(key=lambda row: (-row["samples"], row["name"]))
    return rows


def _record(columns: dict[str, np.ndarray], row: int) -> dict[str, Any]:
    return {
        "id": int(columns["id"][row]),
        "domain": str(columns["domain"][row]),
        "shard": str(columns["shard"][row]),
        "step": int(columns["step"][row]),
        "score": float(columns["score"][row]),
        "replayed": int(columns["replayed"][row]),
        "length": int(columns["length"][row]),
    }


def inspect_replay(
    buffer_dir: Path,
    *,
    show: int = 0,
    as_json: bool = False,
    export: Path | None = None,
    overwrite: bool = False,
    tokenizer: Decoder | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Summarise a replay snapshot; print it (rich, or JSON) and optionally export it.

    ``export`` must not exist unless ``overwrite`` (``--force``); it is checked before any
    work so that a typo'd path fails at once. Returns the report dict (what ``--json`` prints).
    """
    console = console or make_console()
    if export is not None and not overwrite and os.path.lexists(export):
        raise _export_exists(export)
    try:
        reader = SnapshotReader(Path(buffer_dir))
    except CheckpointError as exc:
        raise DataError(str(exc)) from exc
    with reader:
        report = _report(reader, show, tokenizer)
        if export is not None:
            report["exported"] = {
                "path": str(export),
                "samples": _export(reader, export, tokenizer, overwrite=overwrite),
            }
    if as_json:
        console.file.write(json.dumps(report, indent=2) + "\n")
        console.file.flush()
    else:
        _render(report, console)
    return report


def summarize_replay(buffer_dir: Path) -> dict[str, Any]:
    """What ``olm replay-inspect --json`` reports about a snapshot, without printing or previews."""
    try:
        reader = SnapshotReader(Path(buffer_dir))
    except CheckpointError as exc:
        raise DataError(str(exc)) from exc
    with reader:
        return _report(reader, 0, None)


def _columns(reader: SnapshotReader) -> dict[str, np.ndarray]:
    """Columns needed for the report, with domain/shard codes decoded to names."""
    source = reader.columns
    columns = {
        name: np.asarray(source[name]) for name in ("id", "step", "score", "replayed", "length")
    }
    for name, names in (("domain", reader.domains), ("shard", reader.shards)):
        columns[name] = np.asarray(names, dtype=object)[np.asarray(source[name])]
    return columns


def _report(reader: SnapshotReader, show: int, tokenizer: Decoder | None) -> dict[str, Any]:
    manifest = reader.manifest
    columns = _columns(reader)
    size = int(columns["id"].size)
    tokens = int(columns["length"].sum()) if size else 0
    capacity = int(manifest["capacity"])
    used = size if manifest["capacity_unit"] == "samples" else tokens
    most_replayed: list[int] = np.argsort(-columns["replayed"], kind="stable")[:_MOST_REPLAYED].tolist()
    previews = []
    if show > 0 and size:
        by_age = np.argsort(columns["id"], kind="stable")
        picks = by_age[np.unique(np.linspace(0, size - 1, num=min(show, size)).round().astype(int))]
        for row in picks.tolist():
            preview = _record(columns, row)
            ids = reader.tokens(row).tolist()
            if tokenizer is not None:
                preview["text"] = tokenizer.decode(ids)[:_PREVIEW_CHARS]
            else:
                preview["token_ids"] = ids[:64]
            previews.append(preview)
    return {
        "path": str(reader.directory),
        "policy": manifest["policy"],
        "step": int(manifest["step"]),
        "size": size,
        "tokens": tokens,
        "capacity": capacity,
        "capacity_unit": manifest["capacity_unit"],
        "fill": used / capacity if capacity else 0.0,
        "seen": int(manifest["table"]["seen"]),
        "evicted": int(manifest.get("evicted", 0)),
        "stored_logits": int((np.asarray(reader.columns["logits_k"]) > 0).sum()),
        "by_domain": _composition(columns["domain"], columns["length"], size, tokens),
        "by_shard": _composition(columns["shard"], columns["length"], size, tokens),
        "age_histogram": _histogram(columns["step"].astype(np.float64)),
        "score_histogram": _histogram(columns["score"].astype(np.float64)),
        "most_replayed": [_record(columns, row) for row in most_replayed],
        "previews": previews,
    }


def _export_exists(path: Path) -> DataError:
    return DataError(f"--export {path}: the file already exists; pass --force to replace it")


def _export(
    reader: SnapshotReader, path: Path, tokenizer: Decoder | None, *, overwrite: bool
) -> int:
    """Write every sample as a JSON line, atomically: a reader never sees half an export.

    The data goes to a fresh temporary file (never through a symlink) that is then renamed
    to ``path``; with ``overwrite`` a symlink at ``path`` is itself replaced, not followed.
    """
    columns = _columns(reader)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(path, overwrite=overwrite) as handle:
            for row in np.argsort(columns["id"], kind="stable").tolist():
                record = _record(columns, row)
                ids = reader.tokens(row).tolist()
                record["tokens"] = ids
                if tokenizer is not None:
                    record["text"] = tokenizer.decode(ids)
                handle.write((json.dumps(record) + "\n").encode("utf-8"))
    except FileExistsError:
        raise _export_exists(path) from None  # created while we were writing
    except IsADirectoryError:
        raise DataError(f"--export {path}: is a directory") from None
    except OSError as exc:
        raise DataError(f"--export {path}: cannot write ({exc.strerror or exc})") from None
    return int(columns["id"].size)


def _bar(fraction: float, width: int = _BAR_WIDTH) -> str:
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "█" * filled + "·" * (width - filled)


def _render(report: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]Replay buffer[/bold] {report['path']}")
    console.print(
        f"policy [cyan]{report['policy']}[/cyan] at step {report['step']}: "
        f"{report['size']:,} samples, {report['tokens']:,} tokens, "
        f"capacity {report['capacity']:,} {report['capacity_unit']} "
        f"({report['fill']:.0%} full) {_bar(report['fill'])}; "
        f"{report['seen']:,} seen, {report['evicted']:,} evicted"
    )
    for title, key in (
        ("Composition by domain", "by_domain"),
        ("Composition by shard", "by_shard"),
    ):
        table = Table(title=title, title_justify="left")
        for column in ("name", "samples", "tokens", "share", ""):
            table.add_column(column, justify="left" if column in ("name", "") else "right")
        for row in report[key]:
            table.add_row(
                row["name"],
                f"{row['samples']:,}",
                f"{row['tokens']:,}",
                f"{row['share']:.1%}",
                _bar(row["share"]),
            )
        console.print(table)
    for title, key, fmt in (
        ("Age (inserted at step)", "age_histogram", "{:.0f}"),
        ("Score", "score_histogram", "{:.3g}"),
    ):
        histogram = report[key]
        table = Table(title=title, title_justify="left")
        table.add_column("range")
        table.add_column("samples", justify="right")
        table.add_column("")
        peak = max(histogram["counts"], default=0) or 1
        edges = histogram["edges"]
        for i, count in enumerate(histogram["counts"]):
            span = f"{fmt.format(edges[i])} – {fmt.format(edges[i + 1])}"
            table.add_row(span, f"{count:,}", _bar(count / peak))
        console.print(table)
    if report["most_replayed"]:
        table = Table(title="Most replayed", title_justify="left")
        for column in ("id", "domain", "shard", "step", "score", "replayed", "tokens"):
            table.add_column(
                column, justify="right" if column not in ("domain", "shard") else "left"
            )
        for row in report["most_replayed"]:
            table.add_row(
                str(row["id"]),
                row["domain"],
                row["shard"],
                str(row["step"]),
                f"{row['score']:.4g}",
                str(row["replayed"]),
                str(row["length"]),
            )
        console.print(table)
    for preview in report["previews"]:
        body = preview.get("text", preview.get("token_ids"))
        console.print(
            f"[bold]#{preview['id']}[/bold] {preview['domain']} / {preview['shard']} "
            f"step {preview['step']}, {preview['length']} tokens:",
            highlight=False,
        )
        console.print(repr(body) if "text" in preview else str(body), highlight=False, markup=False)
    if "exported" in report:
        console.print(
            f"exported {report['exported']['samples']:,} samples to {report['exported']['path']}"
        )
