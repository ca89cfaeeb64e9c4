"""``olm report``: what each increment did, as one self-contained HTML page with figures.

Three steps, each in its own module: :mod:`~olm_cli.report.sources` reads the run directory into
JSON-ready data (no matplotlib), :mod:`~olm_cli.report.figures` draws the figures from that data,
and :mod:`~olm_cli.report.page` lays them out with the tables. :func:`write_report` writes
``index.html`` and ``report.json`` (the gathered data) into ``RUN/report/`` or ``--out DIR``.

With ``eval.report: true`` the engine calls :func:`refresh_after_increment` after every
increment's evaluation and release; a failure there is one warning line, never a failed night.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olm_cli.errors import OlmError, RecipeError
from olm_cli.report.sources import gather, read_previous
from olm_cli.rundir.atomic import write_text_atomic

REPORT_DIR = "report"
PAGE_FILE = "index.html"
DATA_FILE = "report.json"


@dataclass
class ReportResult:
    page: Path
    data_file: Path
    seconds: float
    data: dict[str, Any]


def default_out(run_dir: Path) -> Path:
    return Path(run_dir) / REPORT_DIR


def write_report(run_dir: Path, out: Path | None = None, *, force: bool = False) -> ReportResult:
    """Gather, draw and write the report of ``run_dir``; return where it is and how long it took.

    ``RUN/report/`` is olm's own and is replaced every time. Another ``out`` is the user's: an
    ``index.html`` or ``report.json`` already there is replaced only with ``force`` (checked
    before any work, so a wrong path fails at once). Files get the umask's modes and appear
    whole or not at all; a symlink at their names is replaced, never written through.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    own = default_out(run_dir)
    out = own if out is None else Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise RecipeError(f"--out {out}: exists and is not a directory")
    if not force and not _same_place(out, own):
        existing = [name for name in (PAGE_FILE, DATA_FILE) if os.path.lexists(out / name)]
        if existing:
            raise RecipeError(f"--out {out}: {' and '.join(existing)} already exist(s) there; "
                              "pass --force to replace them")
    data = gather(run_dir, previous=read_previous(out / DATA_FILE))
    try:
        from olm_cli.report.figures import all_figures
        from olm_cli.report.page import render_page
    except ImportError as exc:
        raise OlmError(f"olm report needs matplotlib ({exc}); install it with: pip install 'olm[report]'") from exc
    figures = all_figures(data)
    data["figures"] = {key: None if figure is None else {"title": figure.title, "alt": figure.alt, **figure.meta}
                       for key, figure in figures.items()}
    page = render_page(data, figures)
    from olm_cli.release import strict_json

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / DATA_FILE, json.dumps(strict_json(data), indent=1, allow_nan=False) + "\n")
    write_text_atomic(out / PAGE_FILE, page)
    return ReportResult(out / PAGE_FILE, out / DATA_FILE, time.perf_counter() - started, data)


def _same_place(a: Path, b: Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def refresh_after_increment(run_dir: Path, say: Callable[[str], Any] | None = None) -> ReportResult | None:
    """``eval.report``: regenerate ``RUN/report/`` after an increment; never raises.

    The night's training, checkpoint and release are done when this runs: a report that cannot
    be drawn (matplotlib missing, a bug, a full disk) is one warning line, not a failed night.
    """
    try:
        result = write_report(run_dir)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the increment already succeeded
        if say is not None:
            say(f"warning: report not regenerated: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        return None
    if say is not None:
        say(f"report → {result.page} ({result.seconds:.1f} s)")
    return result
