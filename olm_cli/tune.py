"""``olm tune``: an Optuna search over recipe keys, each trial a short proxy increment in a scratch copy.

The question a tuning sweep answers for continual training is not "which learning rate fits this
corpus" but "which settings should the *next* increment use": every trial therefore starts where
the real run stands (a copy of its run directory, so the same checkpoint, ledger, replay buffer
and optimiser moments) and trains a proxy increment of ``--steps`` steps on the data the run has
not trained yet. The real run directory is only read.

objective = mean held-out loss after the proxy increment + W x forgetting, where forgetting is the
mean rise (clamped at 0) of the loss of every eval domain the proxy increment did not train, from
the model the trial started from to the model it ended with. The study lives in SQLite in the
tuning directory, so a rerun continues it (``--trials`` is the study's total).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from olm_cli.errors import OlmError, RecipeError, TrainingDivergedError
from olm_cli.recipe import Recipe, load_recipe
from olm_cli.rundir.atomic import atomic_writer, write_json_atomic
from olm_cli.rundir.lock import RunLock

STUDY_FILE = "study.db"
STUDY_NAME = "olm-tune"
BASELINE_FILE = "baseline.json"
BEST_RECIPE_FILE = "best-recipe.yaml"
TRIALS_DIR = "trials"
SKIPPED_WHEN_COPYING = (".lock", "releases")  # the lock is the real run's; trials publish no release
_INT = re.compile(r"[-+]?\d+")


class TuningInterrupted(OlmError):
    """A signal stopped a trial; the trial is marked failed and the study continues on the next run."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------- the search space


@dataclass(frozen=True)
class SearchDimension:
    """One ``--space`` option: a recipe key and the values a trial may give it.

    ``KEY=LOW:HIGH`` is a uniform range (integers when both bounds are integers), ``KEY=LOW:HIGH:log``
    a log-uniform one, ``KEY=A,B,C`` a choice among YAML values.
    """

    key: str
    kind: Literal["float", "int", "choice"]
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple[str, ...] = ()
    text: str = ""

    def distribution(self) -> Any:
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.kind == "choice":
            return CategoricalDistribution(list(self.choices))
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log)
        return FloatDistribution(self.low, self.high, log=self.log)

    def override(self, value: Any) -> str:
        """The ``key=value`` override that gives a trial's recipe ``value``."""
        if self.kind == "float":
            return f"{self.key}={float(value)!r}"
        return f"{self.key}={value}"

    def bounds(self) -> list[Any]:
        """The values to validate up front: a key or value the recipe refuses is an error before any trial."""
        if self.kind == "choice":
            return list(self.choices)
        return [int(self.low), int(self.high)] if self.kind == "int" else [self.low, self.high]


def parse_space(text: str) -> SearchDimension:
    """``optim.lr=1e-5:1e-3:log`` -> a log-uniform float dimension; a malformed one is a RecipeError (exit 2)."""

    def bad(why: str) -> RecipeError:
        return RecipeError(f"--space {text!r}: {why} (e.g. optim.lr=1e-5:1e-3:log, replay.ratio=0:0.5, "
                           "replay.policy=reservoir,fifo)")

    key, sep, spec = text.partition("=")
    key = key.strip()
    if not sep or not key or not spec.strip():
        raise bad("expected KEY=LOW:HIGH[:log] or KEY=A,B,C")
    if any(not part for part in key.split(".")):
        raise bad(f"key {key!r} has an empty part")
    if ":" not in spec:
        choices = tuple(choice.strip() for choice in spec.split(","))
        if len(choices) < 2 or any(not choice for choice in choices):
            raise bad("a choice needs at least two comma-separated values")
        return SearchDimension(key, "choice", choices=choices, text=text)
    parts = [part.strip() for part in spec.split(":")]
    log = len(parts) == 3 and parts[2] == "log"
    if len(parts) not in (2, 3) or (len(parts) == 3 and not log):
        raise bad("a range is LOW:HIGH or LOW:HIGH:log")
    try:
        low, high = float(parts[0]), float(parts[1])
    except ValueError:
        raise bad(f"{parts[0]!r} and {parts[1]!r} must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise bad("LOW must be below HIGH")
    if log and low <= 0:
        raise bad("a log range needs LOW > 0")
    kind: Literal["float", "int"] = "int" if _INT.fullmatch(parts[0]) and _INT.fullmatch(parts[1]) else "float"
    return SearchDimension(key, kind, low=low, high=high, log=log, text=text)


def check_space(config: Path, overrides: list[str], space: list[SearchDimension]) -> None:
    """Every key exists and every bound is a value the recipe accepts: one error naming the --space option."""
    keys = [dimension.key for dimension in space]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise RecipeError(f"--space names {', '.join(repeated)} more than once")
    for dimension in space:
        for value in dimension.bounds():
            try:
                load_recipe(config, [*overrides, dimension.override(value)])
            except RecipeError as exc:
                problems = str(exc).splitlines()
                why = "; ".join(line.strip() for line in problems[1:]) or problems[0]
                raise RecipeError(f"--space {dimension.text!r}: {why}") from None


# --------------------------------------------------------------------------- trials


@dataclass
class TrialRow:
    """One finished trial, as the table and ``--json`` show it."""

    number: int
    state: str
    params: dict[str, Any]
    objective: float | None = None
    mean_loss: float | None = None
    forgetting: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    message: str = ""


@dataclass
class TuneReport:
    tune_dir: Path
    study: Path
    rows: list[TrialRow]
    best: TrialRow | None
    best_recipe: Path | None
    forgetting_weight: float
    ran: int

    def to_json(self) -> dict[str, Any]:
        return {
            "tune_dir": str(self.tune_dir), "study": str(self.study), "forgetting_weight": self.forgetting_weight,
            "trials_run_now": self.ran, "best": self.best.__dict__ if self.best else None,
            "best_recipe": str(self.best_recipe) if self.best_recipe else None,
            "trials": [row.__dict__ for row in self.rows],
        }


def default_tune_dir(recipe: Recipe) -> Path:
    """``RUN.tune`` next to the run directory: tuning never writes inside the run it studies."""
    run_dir = Path(recipe.run.dir)
    return run_dir.with_name(run_dir.name + ".tune")


def objective_of(before: dict[str, float], after: dict[str, float], trained: str | None,
                 weight: float) -> tuple[float, float, float]:
    """(objective, mean held-out loss, forgetting) of a trial from the eval losses before and after it."""
    mean_loss = sum(after.values()) / len(after)
    rises = [max(0.0, after[name] - before[name]) for name in after if name != trained and name in before]
    forgetting = sum(rises) / len(rises) if rises else 0.0
    return mean_loss + weight * forgetting, mean_loss, forgetting


def _eval_rows(run_dir: Path) -> list[dict[str, Any]]:
    from olm_cli.evaluation.domains import HISTORY_FILE

    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _losses(row: dict[str, Any]) -> dict[str, float]:
    return {name: float(result["loss"]) for name, result in row["domains"].items()}


def baseline_losses(recipe: Recipe, tune_dir: Path) -> dict[str, float] | None:
    """Eval losses of the model every trial starts from: the run's newest usable checkpoint.

    Measured once and kept in the tuning directory (keyed by the checkpoint), so a resumed study
    compares against the same numbers. None for a run with no checkpoint yet: each trial then
    records its starting model's losses itself (row 0 of its matrix).
    """
    from olm_cli.commands import _latest_usable, _load_model
    from olm_cli.evaluation.domains import evaluate_domains
    from olm_cli.rundir.checkpoint import CheckpointManager

    run_dir = Path(recipe.run.dir)
    if not (run_dir / "checkpoints").is_dir() or not CheckpointManager(run_dir / "checkpoints").list():
        return None
    cached = tune_dir / BASELINE_FILE
    checkpoint, (model, tokenizer) = _latest_usable(run_dir, _load_model)
    if cached.is_file():
        saved = json.loads(cached.read_text(encoding="utf-8"))
        if saved.get("checkpoint") == checkpoint.name and saved.get("sets") == recipe.eval.sets:
            return {name: float(loss) for name, loss in saved["losses"].items()}
    results = evaluate_domains(model, tokenizer, recipe.eval.sets, block_size=recipe.data.block_size,
                               max_tokens=recipe.eval.max_tokens, batch_size=recipe.eval.batch_size,
                               text_field=recipe.data.text_field)
    losses = {name: result["loss"] for name, result in results.items()}
    write_json_atomic(cached, {"checkpoint": checkpoint.name, "sets": recipe.eval.sets, "losses": losses})
    return losses


def _scratch_copy(run_dir: Path, scratch: Path) -> None:
    """A full copy (never hard links: a trial appends to metrics and rewrites files in place)."""
    if scratch.exists():
        shutil.rmtree(scratch)  # a trial killed mid-way left it; it was marked failed
    scratch.parent.mkdir(parents=True, exist_ok=True)
    if run_dir.is_dir():
        shutil.copytree(run_dir, scratch, symlinks=True, ignore=lambda _d, names: [n for n in names if n in SKIPPED_WHEN_COPYING])


def run_trial(config: Path, overrides: list[str], params: list[str], *, scratch: Path, run_dir: Path, steps: int,
              baseline: dict[str, float] | None, weight: float) -> tuple[float, float, float, dict[str, float]]:
    """Train one proxy increment in ``scratch`` and return (objective, mean loss, forgetting, losses)."""
    from olm_cli.increment import run_increment

    _scratch_copy(run_dir, scratch)
    recipe = load_recipe(config, [*overrides, *params, f"run.dir={json.dumps(str(scratch))}", f"run.max_steps={steps}",
                                  "run.max_tokens=null", "run.time_budget=null", "run.progress=false",
                                  "eval.after_increment=true", "release.enabled=false"])
    outcome = run_increment(recipe)
    if outcome.status == "interrupted":
        raise TuningInterrupted("trial stopped by a signal; rerun `olm tune` to continue the study", outcome.exit_code)
    if outcome.status == "nothing_to_do":
        raise OlmError(f"{run_dir}: nothing to tune on, every shard of the recipe is trained already; add shards first")
    if outcome.exit_code != 0:
        raise OlmError(outcome.message or f"the proxy increment ended with {outcome.status}")
    rows = _eval_rows(scratch)
    if not rows:
        raise OlmError("the proxy increment recorded no evaluation")
    after = _losses(rows[-1])
    before = baseline
    if before is None:
        start = [row for row in rows if row.get("increment") == 0]
        before = _losses(start[-1]) if start else {}
    objective, mean_loss, forgetting = objective_of(before, after, rows[-1].get("trained"), weight)
    return objective, mean_loss, forgetting, after


def run_tuning(config: Path, overrides: list[str], space: list[SearchDimension], *, trials: int, steps: int,
               forgetting_weight: float, tune_dir: Path | None, out: Path | None, force: bool,
               say: Any = print) -> TuneReport:
    """Run (or continue) the study until it holds ``trials`` finished trials; write the best recipe."""
    if trials < 1 or steps < 1:
        raise RecipeError("--trials and --steps must be at least 1")
    if not math.isfinite(forgetting_weight) or forgetting_weight < 0:
        raise RecipeError("--objective-forgetting-weight must be zero or more")
    if not space:
        raise RecipeError("give at least one --space KEY=LOW:HIGH[:log] (e.g. --space optim.lr=1e-5:1e-3:log)")
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise OlmError("olm tune needs Optuna: pip install 'olm[tune]'") from None
    recipe = load_recipe(config, overrides)
    if not recipe.eval.sets:
        raise RecipeError(f"{config}: olm tune needs eval.sets (the objective is held-out loss)")
    check_space(config, overrides, space)
    tune_dir = Path(tune_dir) if tune_dir is not None else default_tune_dir(recipe)
    run_dir = Path(recipe.run.dir)
    if tune_dir.resolve() == run_dir.resolve() or run_dir.resolve() in tune_dir.resolve().parents:
        raise RecipeError(f"--dir {tune_dir}: the tuning directory must be outside the run directory {run_dir}")
    if out is not None and Path(out).exists() and not force:
        raise RecipeError(f"--out {out}: file exists; pass --force to replace it")

    with RunLock(tune_dir):
        study = _open_study(tune_dir, config, overrides, space, steps, forgetting_weight, recipe.run.seed)
        baseline = baseline_losses(recipe, tune_dir)
        ran = _run_trials(study, config, overrides, space, tune_dir=tune_dir, run_dir=run_dir, trials=trials,
                          steps=steps, baseline=baseline, weight=forgetting_weight, say=say)
        rows = _rows(study, space)
        done = [row for row in rows if row.state == "COMPLETE" and row.objective is not None]
        best = min(done, key=lambda row: row.objective or math.inf) if done else None
        best_path = None
        if best is not None:
            best_path = Path(out) if out is not None else tune_dir / BEST_RECIPE_FILE
            _write_best_recipe(config, overrides, space, best, best_path, replace=out is None or force,
                               trials=len(done), weight=forgetting_weight)
    return TuneReport(tune_dir, tune_dir / STUDY_FILE, rows, best, best_path, forgetting_weight, ran)


def _open_study(tune_dir: Path, config: Path, overrides: list[str], space: list[SearchDimension], steps: int,
                weight: float, seed: int) -> Any:
    """The study in ``TUNE/study.db``; a rerun must ask the same question (same space, steps and weight)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(tune_dir / STUDY_FILE).resolve()}"
    existing = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="minimize", load_if_exists=True)
    # Seeded by the run's seed and the trials so far: reproducible, yet a continued study does not
    # draw its first (random, start-up) trials again.
    sampler = optuna.samplers.TPESampler(seed=seed + len(existing.get_trials(deepcopy=False)))
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="minimize", load_if_exists=True,
                                sampler=sampler)
    question = {"config": str(Path(config).resolve()), "overrides": list(overrides),
                "space": [dimension.text for dimension in space], "steps": steps, "forgetting_weight": weight}
    asked = study.user_attrs.get("question")
    if asked is None:
        study.set_user_attr("question", question)
    elif asked != question:
        changed = ", ".join(key for key in question if asked.get(key) != question[key])
        raise RecipeError(f"{tune_dir}: this study was started with other settings ({changed} differ); "
                          "rerun with the same ones to continue it, or pass --dir for a new study")
    # A trial whose process died (kill -9, power cut) stays RUNNING in the database forever.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def _run_trials(study: Any, config: Path, overrides: list[str], space: list[SearchDimension], *, tune_dir: Path,
                run_dir: Path, trials: int, steps: int, baseline: dict[str, float] | None, weight: float,
                say: Any) -> int:
    import optuna

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    have = len(study.get_trials(deepcopy=False, states=finished))
    if have >= trials:
        say(f"the study already holds {have} finished trial(s) (--trials {trials}); nothing to run")
        return 0
    say(f"running {trials - have} trial(s) of {steps} step(s) each ({have} already in {tune_dir / STUDY_FILE})")
    distributions = {dimension.key: dimension.distribution() for dimension in space}
    ran = 0
    for _ in range(trials - have):
        trial = study.ask(distributions)
        params = [dimension.override(trial.params[dimension.key]) for dimension in space]
        scratch = tune_dir / TRIALS_DIR / f"trial-{trial.number:04d}"
        say(f"trial {trial.number}: {' '.join(params)}")
        try:
            objective, mean_loss, forgetting, losses = run_trial(
                config, overrides, params, scratch=scratch, run_dir=run_dir, steps=steps, baseline=baseline,
                weight=weight)
        except TuningInterrupted:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        except TrainingDivergedError as exc:
            # A diverging setting is an answer, not a failure of the sweep.
            trial.set_user_attr("message", str(exc).splitlines()[0])
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            say(f"trial {trial.number}: diverged")
            continue
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        trial.set_user_attr("mean_loss", mean_loss)
        trial.set_user_attr("forgetting", forgetting)
        trial.set_user_attr("losses", losses)
        study.tell(trial, objective)
        ran += 1
        say(f"trial {trial.number}: objective {objective:.4f} (mean loss {mean_loss:.4f}, forgetting {forgetting:.4f})")
    return ran


def _rows(study: Any, space: list[SearchDimension]) -> list[TrialRow]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        rows.append(TrialRow(number=trial.number, state=trial.state.name,
                             params={d.key: trial.params.get(d.key) for d in space},
                             objective=trial.value, mean_loss=attrs.get("mean_loss"),
                             forgetting=attrs.get("forgetting"), losses=dict(attrs.get("losses", {})),
                             message=str(attrs.get("message", ""))))
    return rows


def _write_best_recipe(config: Path, overrides: list[str], space: list[SearchDimension], best: TrialRow, path: Path,
                       *, replace: bool, trials: int, weight: float) -> None:
    """The recipe with the best trial's values, resolved (absolute paths), so it runs from anywhere."""
    by_key = {dimension.key: dimension for dimension in space}
    params = [by_key[key].override(value) for key, value in best.params.items()]
    recipe = load_recipe(config, [*overrides, *params])
    header = (f"# olm train --config {path}\n"
              f"# The best of {trials} olm tune trial(s) on {config}: objective {best.objective:.4f} = mean held-out "
              f"loss {best.mean_loss:.4f} + {weight:g} x forgetting {best.forgetting:.4f}.\n"
              f"# Tuned: {' '.join(params)}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(path, overwrite=replace) as handle:
            handle.write((header + recipe.to_yaml()).encode("utf-8"))
    except FileExistsError:
        raise RecipeError(f"--out {path}: file exists; pass --force to replace it") from None


def render_report(report: TuneReport, space: list[SearchDimension], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"olm tune: {report.study}")
    table.add_column("trial", justify="right")
    for dimension in space:
        table.add_column(dimension.key, justify="right")
    for name in ("mean loss", "forgetting", "objective"):
        table.add_column(name, justify="right")
    table.add_column("state")

    def number(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3g}" if isinstance(value, float) else str(value)

    for row in report.rows:
        mark = " *" if report.best is not None and row.number == report.best.number else ""
        table.add_row(f"{row.number}{mark}", *[number(row.params.get(d.key)) for d in space],
                      number(row.mean_loss), number(row.forgetting), number(row.objective),
                      row.state.lower() + (f": {row.message}" if row.message else ""))
    console.print(table)
    if report.best is not None and report.best_recipe is not None:
        console.print(f"best: trial {report.best.number} (objective {report.best.objective:.4f}) → {report.best_recipe}")
    else:
        console.print("no trial finished; no best recipe written")

