"""Experiment trackers (``run.trackers``): TensorBoard, MLflow, W&B, Aim, Comet, ClearML, ...

olm logs through Accelerate's tracker classes (``accelerate.tracking``), one per name in the
recipe, with tags a dashboard can group:

* every ``run.log_every`` steps: ``train/loss``, ``train/lr``, ``train/tokens_per_s``,
  ``train/grad_norm``, ``train/tokens``, ``train/batch_size``, ``train/micro_batch``,
  ``train/replay_share``, and the selector's statistics as ``select/<name>``;
* after every increment's evaluation: ``eval/<domain>/loss``, ``eval/<domain>/perplexity``,
  ``eval/mean_loss``, and the continual-learning matrix's summary as ``cl/forgetting/<domain>``,
  ``cl/bwt/<domain>``, ``cl/fwt/<domain>``, ``cl/mean_forgetting``, ``cl/bwt``, ``cl/fwt``;
* ``olm eval --tasks``: ``downstream/<task>/<metric>``.

The tracker's step is the run's global optimizer step, and the time of a point is the
tracker's own wall-clock time: no ``step``, ``increment`` or clock value is logged as a metric.
Non-finite values are left out (``metrics.jsonl`` records them as null and names them).

A tracker that fails while the night trains (a network outage, a full quota) is reported once
and dropped: it never stops training. A tracker whose package is missing is a recipe error
before anything is trained. Each run directory keeps one tracker run for its whole life where
the tracker can resume one (MLflow's run id, W&B's run id, Aim's run hash in
``RUN/trackers.json``), so every night extends the same curves.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from olm_cli.errors import RecipeError
from olm_cli.rundir.atomic import write_json_atomic

logger = logging.getLogger(__name__)

# The recipe's name -> (the module the tracker imports, the package to install).
TRACKER_PACKAGES: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "mlflow": (("mlflow",), "mlflow"),
    "wandb": (("wandb",), "wandb"),
    "aim": (("aim",), "aim"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "clearml": (("clearml",), "clearml"),
    "dvclive": (("dvclive",), "dvclive"),
    "swanlab": (("swanlab",), "swanlab"),
    "trackio": (("trackio",), "trackio"),
}
TRACKER_NAMES = tuple(TRACKER_PACKAGES)
# Per tracker, arguments of every log call. MLflow writes each call to its store before returning
# (tens of milliseconds with SQLite, a round trip with a server): queued instead, flushed when the
# run ends, so the step never waits for it.
LOG_OPTIONS: dict[str, dict[str, Any]] = {"mlflow": {"synchronous": False}}
IDENTITY_FILE = "trackers.json"
TENSORBOARD_DIR = "tensorboard"


def missing_packages(names: list[str]) -> list[str]:
    """The ``pip install`` names of the trackers in ``names`` whose package cannot be imported."""
    missing = []
    for name in names:
        modules, package = TRACKER_PACKAGES[name]
        if not any(importlib.util.find_spec(module) is not None for module in modules):
            missing.append(package)
    return missing


# --------------------------------------------------------------------------- tags


# What every tracker accepts in a tag (MLflow is the strictest): a domain folder named `c++` becomes `c__`.
_UNSAFE_TAG_CHARACTERS = re.compile(r"[^\w\-. /]")


def _finite(values: Mapping[str, Any]) -> dict[str, float]:
    """Numbers only, and only finite ones (booleans are not metrics), under tags every tracker accepts."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[_UNSAFE_TAG_CHARACTERS.sub("_", key)] = value
    return out


# metrics.jsonl field -> tracker tag, for a trained step.
STEP_TAGS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
    "grad_norm": "train/grad_norm",
    "tokens": "train/tokens",
    "batch_size": "train/batch_size",
    "micro_batch": "train/micro_batch",
    "unselected": "select/unselected",
}
# Bookkeeping fields of a metrics line that are not measurements.
NOT_METRICS = {"step", "increment", "increment_step", "time", "cpu_time", "replayed", "domain", "skipped",
               "reason", "nonfinite"}


def step_tags(row: Mapping[str, Any]) -> dict[str, float]:
    """The tracker tags of one ``metrics.jsonl`` line (a trained or a skipped step)."""
    if row.get("skipped"):
        return {"train/skipped_batches": 1}
    tags = {tag: row[key] for key, tag in STEP_TAGS.items() if key in row}
    if row.get("batch_size"):
        tags["train/replay_share"] = row.get("replayed", 0) / row["batch_size"]
    for key, value in row.items():
        if key not in STEP_TAGS and key not in NOT_METRICS:
            tags[f"select/{key}"] = value  # the selector's own statistics
    return _finite(tags)


def eval_tags(results: Mapping[str, Mapping[str, float]], summary: Mapping[str, Any] | None) -> dict[str, float]:
    """Per-domain held-out loss after an increment and the continual-learning matrix's summary."""
    tags: dict[str, Any] = {}
    for domain, result in results.items():
        tags[f"eval/{domain}/loss"] = result.get("loss")
        tags[f"eval/{domain}/perplexity"] = result.get("perplexity")
    if summary:
        tags["eval/mean_loss"] = summary.get("average_final_loss")
        for measure, per_domain in (("forgetting", "forgetting"), ("bwt", "bwt_per_domain"),
                                    ("fwt", "fwt_per_domain"), ("intransigence", "intransigence")):
            for domain, value in (summary.get(per_domain) or {}).items():
                tags[f"cl/{measure}/{domain}"] = value
        for key in ("mean_forgetting", "bwt", "fwt", "mean_intransigence"):
            tags[f"cl/{key}"] = summary.get(key)
    return _finite(tags)


def downstream_tags(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """``downstream/<task>/<metric>`` for every numeric metric of every task."""
    return _finite({f"downstream/{task}/{metric}": value
                    for task, metrics in results.items() for metric, value in metrics.items()})


# --------------------------------------------------------------------------- the trackers


class Trackers:
    """The recipe's trackers, started on the main process; every call is a no-op without any."""

    def __init__(self, trackers: list[Any], say: Callable[[str], None]) -> None:
        self._trackers = trackers
        self._say = say

    @property
    def names(self) -> list[str]:
        return [str(tracker.name) for tracker in self._trackers]

    @classmethod
    def none(cls) -> Trackers:
        return cls([], lambda _message: None)

    @classmethod
    def open(cls, recipe: Any, *, main_process: bool = True, say: Callable[[str], None] | None = None) -> Trackers:
        """Start every tracker of ``recipe.run.trackers`` for the run directory (main process only).

        A missing package is a :class:`RecipeError` (exit 2) naming what to install; a tracker
        that installs but fails to start (no network, no credentials) is a warning, and the
        night trains without it.
        """
        say = say or (lambda _message: None)
        names = list(recipe.run.trackers)
        if not names:
            return cls([], say)
        missing = missing_packages(names)
        if missing:
            raise RecipeError(f"run.trackers: {', '.join(names)} needs the package(s) {', '.join(missing)}: "
                              f"pip install {' '.join(missing)}")
        if not main_process:
            return cls([], say)
        run_dir = Path(recipe.run.dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        identity_path = run_dir / IDENTITY_FILE
        identity = _read_identity(identity_path)
        project = recipe.run.tracker_project or run_dir.name
        started = []
        for name in names:
            options = dict(recipe.run.tracker_options.get(name, {}))
            new_run = name not in identity
            try:
                tracker = _build(name, project, run_dir, options, identity)
                tracker.start()
                if new_run and name != "tensorboard":  # TensorBoard would open a second run for hparams
                    # The recipe as the run's parameters, once: MLflow refuses to change a logged one.
                    tracker.store_init_configuration(recipe_parameters(recipe))
            except Exception as exc:  # any tracker's own failure: train without it
                say(f"[yellow]warning:[/] tracker {name} did not start ({type(exc).__name__}: {exc}); "
                    "training goes on without it")
                continue
            _remember(name, tracker, identity)
            started.append(tracker)
        if identity:
            write_json_atomic(identity_path, identity)
        return cls(started, say)

    def log(self, tags: Mapping[str, float], step: int) -> None:
        """Log ``tags`` at ``step`` on every tracker; a tracker that raises is reported and dropped."""
        if not tags or not self._trackers:
            return
        for tracker in list(self._trackers):
            try:
                tracker.log(dict(tags), step=step, **LOG_OPTIONS.get(tracker.name, {}))
            except Exception as exc:
                self._drop(tracker, exc)

    def log_step(self, row: Mapping[str, Any]) -> None:
        self.log(step_tags(row), int(row["step"]))

    def log_eval(self, results: Mapping[str, Mapping[str, float]], summary: Mapping[str, Any] | None,
                 step: int) -> None:
        self.log(eval_tags(results, summary), step)

    def log_downstream(self, results: Mapping[str, Mapping[str, Any]], step: int) -> None:
        self.log(downstream_tags(results), step)

    def close(self) -> None:
        for tracker in self._trackers:
            try:
                tracker.finish()
            except Exception as exc:  # the data is logged; a failed flush is worth a line, not a crash
                self._say(f"[yellow]warning:[/] tracker {tracker.name} did not finish cleanly ({exc})")
        self._trackers = []

    def _drop(self, tracker: Any, exc: Exception) -> None:
        self._say(f"[yellow]warning:[/] tracker {tracker.name} failed ({type(exc).__name__}: {exc}); "
                  "no more points go to it in this invocation")
        self._trackers.remove(tracker)


def recipe_parameters(recipe: Any) -> dict[str, Any]:
    """The resolved recipe as flat ``section.key`` parameters (scalars as they are, the rest as JSON)."""
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
        elif node is None or isinstance(node, bool | int | float | str):
            flat[prefix] = node
        else:
            flat[prefix] = json.dumps(node)

    walk(recipe.model_dump(mode="json"), "")
    return flat


def _build(name: str, project: str, run_dir: Path, options: dict[str, Any], identity: dict[str, Any]) -> Any:
    """One of Accelerate's tracker classes, pointed at the run directory and its remembered identity."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    remembered = identity.get(name, {})
    tracker_class = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":
        # RUN/tensorboard: one folder, a new events file per invocation, the global step as x axis.
        return tracker_class(TENSORBOARD_DIR, str(run_dir), **options)
    if name == "mlflow":
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # the store and the artifacts in the run directory, not in whatever the cwd is
            uri = f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
            options.setdefault("logging_dir", str(run_dir.resolve() / "mlflow-artifacts"))
        mlflow.set_tracking_uri(uri)  # pinned: MLflow's exit hooks must not fall back to ./mlflow.db
        uri = mlflow.get_tracking_uri()
        if remembered.get("tracking_uri") == uri and remembered.get("run_id"):
            options.setdefault("run_id", remembered["run_id"])
        options.setdefault("run_name", run_dir.name)
        return tracker_class(experiment_name=project, **options)
    if name == "wandb":
        options.setdefault("id", remembered.get("id") or uuid.uuid4().hex[:16])
        options.setdefault("resume", "allow")
        options.setdefault("name", run_dir.name)
        if not os.environ.get("WANDB_DIR"):
            options.setdefault("dir", str(run_dir))
        return tracker_class(project, **options)
    if name == "aim":
        if remembered.get("run_hash"):
            options.setdefault("run_hash", remembered["run_hash"])
        return tracker_class(project, str(run_dir), **options)
    if tracker_class.requires_logging_directory:
        return tracker_class(project, str(run_dir), **options)
    return tracker_class(project, **options)


def _remember(name: str, tracker: Any, identity: dict[str, Any]) -> None:
    """Keep what lets the next invocation continue the same tracker run."""
    if name == "mlflow":
        import mlflow

        identity[name] = {"tracking_uri": mlflow.get_tracking_uri(), "run_id": tracker.tracker.info.run_id}
    elif name == "wandb":
        identity[name] = {"id": tracker.init_kwargs["id"]}
    elif name == "aim":
        identity[name] = {"run_hash": tracker.writer.hash}


def _read_identity(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("%s is unreadable (%s); the trackers start new runs", path, exc)
        return {}
    return data if isinstance(data, dict) else {}
