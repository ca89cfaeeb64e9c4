"""Downstream evaluation with lm-evaluation-harness: ``olm eval --tasks`` (the optional extra ``olm[lm-eval]``).

Held-out loss says whether the model still predicts each domain's text; a downstream task says
whether it still does the job (answers the multiple-choice question, completes the sentence).
lm-evaluation-harness is the field's standard runner; olm hands it the model and tokenizer it
already loaded (the release serving reads, or a checkpoint) and records what it measures:

* ``RUN/eval/history.jsonl`` gets one row per run of ``olm eval --tasks``:
  ``{"increment", "step", "time", "model", "settings", "downstream": {task: {metric: value}}}``,
  the metric names being lm-eval's (``acc``, ``acc_norm``, ``acc_stderr`` ...; a filter other than
  ``none`` is appended: ``exact_match_strict-match``);
* the run's trackers get ``downstream/<task>/<metric>`` at the model's global step.

Standard tasks (``hellaswag``, ``arc_easy`` ...) download their datasets from the Hugging Face
hub on first use; a task of your own is a YAML file in a ``--task-dir`` folder
(docs/operations.md shows one over a local jsonl file).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from olm_cli.errors import OlmError, RecipeError

EXTRA = "lm-eval"
DOWNSTREAM_KEY = "downstream"


def require_lm_eval() -> None:
    """A usage error (exit 2) naming the extra to install when lm-evaluation-harness is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"olm eval --tasks needs lm-evaluation-harness: pip install 'olm[{EXTRA}]' "
                          "(or pip install lm-eval)")


def parse_tasks(text: str) -> list[str]:
    """``"arc_easy, hellaswag"`` -> ``["arc_easy", "hellaswag"]`` (order kept, repeats dropped)."""
    names = [name.strip() for name in text.split(",")]
    names = list(dict.fromkeys(name for name in names if name))
    if not names:
        raise RecipeError(f"--tasks {text!r}: name at least one task, e.g. --tasks arc_easy,hellaswag")
    return names


@dataclass
class ModelUnderTest:
    """The model a downstream run measures and where its results go."""

    path: Path
    run_dir: Path | None  # None: a model directory outside any run (results are printed only)
    increment: int | None
    step: int | None


def model_position(path: Path) -> tuple[int | None, int | None]:
    """(increment, global step) of an olm checkpoint (trainer_state.json) or release (release.json)."""
    from olm_cli.release import RELEASE_INFO
    from olm_cli.run_state import TRAINER_STATE

    for name, step_key in ((TRAINER_STATE, "global_step"), (RELEASE_INFO, "step")):
        try:
            info = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict):
            increment, step = info.get("increment"), info.get(step_key)
            return (int(increment) if isinstance(increment, int) else None,
                    int(step) if isinstance(step, int) else None)
    return None, None


def owning_run(path: Path) -> Path | None:
    """The run directory a checkpoint or release belongs to (``RUN/checkpoints/X``, ``RUN/releases/X``)."""
    resolved = path.resolve()
    parent = resolved.parent
    if parent.name in ("checkpoints", "releases") and (parent.parent / "recipe.yaml").is_file():
        return parent.parent
    return None


def normalise_results(raw: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"acc,none": 0.5, "alias": ...}`` per task -> ``{"acc": 0.5}`` (finite numbers only)."""
    out: dict[str, dict[str, float]] = {}
    for task, values in raw.items():
        metrics: dict[str, float] = {}
        for key, value in values.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                continue  # "alias", "sample_len", an "N/A" standard error
            metrics[metric if filter_name == "none" else f"{metric}_{filter_name}"] = float(value)
        out[task] = metrics
    return out


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """lm-eval and datasets print progress; stdout stays for olm's own output (``--json``)."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def task_manager(tasks: list[str], task_dirs: list[Path]) -> Any:
    """lm-eval's TaskManager over its own tasks and ``task_dirs``; every name in ``tasks`` must be known.

    Checked before a model is loaded: a misspelt task is a usage error (exit 2) with a hint.
    """
    require_lm_eval()
    for directory in task_dirs:
        if not Path(directory).is_dir():
            raise RecipeError(f"--task-dir {directory}: no such directory")
    with _stdout_to_stderr():
        from lm_eval.tasks import TaskManager

        manager = None
        if task_dirs:  # tasks of your own only: indexing lm-eval's thousands of task files takes a while
            manager = TaskManager(include_path=[str(d) for d in task_dirs], include_defaults=False)
            if not set(tasks) <= set(manager.all_tasks):
                manager = None
        if manager is None:
            manager = TaskManager(include_path=[str(d) for d in task_dirs] or None)
    known = set(manager.all_tasks)
    unknown = [name for name in tasks if name not in known]
    if unknown:
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known, n=1))
                 else name for name in unknown]
        raise RecipeError(f"--tasks: unknown lm-eval task(s): {', '.join(hints)}; "
                          "`lm-eval ls tasks` lists them, --task-dir adds your own")
    return manager


def run_tasks(model: Any, tokenizer: Any, tasks: list[str], manager: Any, *, limit: int | None,
              num_fewshot: int | None, batch_size: int) -> dict[str, dict[str, float]]:
    """Evaluate ``model`` on ``tasks`` with lm-evaluation-harness; per task, its metrics."""
    with _stdout_to_stderr():
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        device = next(model.parameters()).device
        # Handing HFLM a loaded model is deliberate here; its two warnings about that are not for the user.
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        finally:
            hf_logger.setLevel(level)
        try:
            output = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                             num_fewshot=num_fewshot, log_samples=False)
        except (OSError, ConnectionError) as exc:  # a hub dataset on a machine without network, a missing file
            raise OlmError(f"lm-eval could not load the data of --tasks {','.join(tasks)}: {exc}") from None
    if not output or not output.get("results"):
        raise OlmError(f"lm-eval returned no results for --tasks {','.join(tasks)}")
    return normalise_results(output["results"])


def record_downstream(target: ModelUnderTest, results: dict[str, dict[str, float]], *, settings: str,
                      trackers: Any = None) -> None:
    """Append the results to the run's eval history and log them to its trackers."""
    from olm_cli.evaluation.domains import HISTORY_FILE
    from olm_cli.rundir.atomic import append_line_durable

    if target.run_dir is None:
        return
    row = {"increment": target.increment, "step": target.step, "time": time.time(),
           "model": str(target.path), "settings": settings, DOWNSTREAM_KEY: results}
    path = target.run_dir / HISTORY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    append_line_durable(path, json.dumps(row, allow_nan=False))
    if trackers is not None and target.step is not None:
        trackers.log_downstream(results, target.step)


def render_downstream(results: dict[str, dict[str, float]], console: Any, title: str) -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("task")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("stderr", justify="right")
    for task, metrics in results.items():
        # "acc_stderr" goes with "acc", "exact_match_stderr_strict-match" with "exact_match_strict-match".
        errors = {name.replace("_stderr", "", 1): value for name, value in metrics.items() if "_stderr" in name}
        for metric, value in metrics.items():
            if "_stderr" not in metric:
                stderr = errors.get(metric)
                table.add_row(task, metric, f"{value:.4f}", "-" if stderr is None else f"{stderr:.4f}")
    console.print(table)
