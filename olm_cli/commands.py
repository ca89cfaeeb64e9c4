"""Reporting commands (``olm eval``, ``olm replay-inspect``) that read a run directory.

Kept out of ``cli.py`` so the CLI stays argument parsing only, and out of ``engine.py`` because
they never train. Like training, they re-hash a checkpoint against its manifest before using it
and fall back to an older one (with a warning) when the newest cannot be used.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from olm_cli.errors import CheckpointLoadError, DataError, OlmError, RecipeError
from olm_cli.evaluation.domains import MATRIX_FILE, evaluate_domains, render_results
from olm_cli.rundir.checkpoint import (
    MANIFEST_FILENAME,
    CheckpointFallback,
    CheckpointManager,
    loading_checkpoint,
    verify_checkpoint,
)

T = TypeVar("T")


def _run_recipe(run: Path) -> Any:
    from olm_cli.recipe import load_recipe

    path = Path(run) / "recipe.yaml"
    if not path.exists():
        raise OlmError(f"{run}: not an olm run directory (no recipe.yaml); run `olm train` first")
    return load_recipe(path, written_by_olm=True)


def _latest_usable(run: Path, use: Callable[[Path], T]) -> tuple[Path, T]:
    """``use`` applied to the newest checkpoint of ``run`` that verifies deeply and loads.

    Each checkpoint passed over is one warning line on stderr (stdout may be ``--json``);
    when checkpoints exist but none can be used, that is one error naming each.
    """
    fallback = CheckpointFallback(CheckpointManager(Path(run) / "checkpoints"))
    while True:
        checkpoint = fallback.choose(deep=True)
        if checkpoint is None:
            if fallback.rejected:
                raise fallback.none_usable()
            raise OlmError(f"{run}: no complete checkpoint yet")
        try:
            result = use(checkpoint)
        except CheckpointLoadError as exc:
            fallback.reject(checkpoint, exc.reason)
            continue
        for warning in fallback.warnings():
            sys.stderr.write(f"warning: {warning}\n")
        return checkpoint, result


def _verified(directory: Path) -> Path:
    """``directory`` after re-hashing it, if it is an olm checkpoint (it has a manifest).

    A plain Hugging Face directory has nothing to verify against; loading it is the check.
    """
    if (directory / MANIFEST_FILENAME).is_file():
        verify_checkpoint(directory, deep=True)
    return directory


def _load_model(directory: Path) -> tuple[Any, Any]:
    """Model and tokenizer; any failure to load them is one CheckpointLoadError line (exit 1)."""
    from olm_cli.modeling import load_pretrained, load_tokenizer

    with loading_checkpoint(directory, "the model or tokenizer"):
        return load_pretrained(str(directory)), load_tokenizer(str(directory))


def run_eval(
    *,
    run: Path | None,
    checkpoint: Path | None,
    data: dict[str, str],
    block_size: int | None,
    max_tokens: int | None,
    as_json: bool,
    console: Any,
) -> dict[str, dict[str, float]]:
    if (run is None) == (checkpoint is None):
        raise RecipeError("give exactly one of --run DIR or --checkpoint DIR")
    recipe = _run_recipe(run) if run is not None else None
    if checkpoint is not None and not Path(checkpoint).is_dir():
        raise OlmError(f"{checkpoint}: no such checkpoint directory")
    sets = data or (recipe.eval.sets if recipe is not None else {})
    if not sets:
        raise RecipeError("nothing to evaluate: pass --data NAME=PATH (or a run whose recipe has eval.sets)")
    for name, path in sets.items():
        if not Path(path).is_file():
            raise OlmError(f"{path}: eval file for domain {name!r} not found")
    if run is not None:
        model_dir, (model, tokenizer) = _latest_usable(run, _load_model)
    else:
        model_dir = _verified(Path(checkpoint))  # type: ignore[arg-type]
        model, tokenizer = _load_model(model_dir)
    results = evaluate_domains(
        model,
        tokenizer,
        sets,
        block_size=block_size or (recipe.data.block_size if recipe else 256),
        max_tokens=max_tokens or (recipe.eval.max_tokens if recipe else 50_000),
        batch_size=recipe.eval.batch_size if recipe else 8,
        text_field=recipe.data.text_field if recipe else "text",
    )
    if as_json:
        sys.stdout.write(json.dumps({"checkpoint": str(model_dir), "domains": results}, indent=2) + "\n")
    else:
        render_results(results, console, title=f"eval: {model_dir}")
    return results


def show_matrix(run: Path, *, union: dict[str, float] | None, as_json: bool, console: Any) -> None:
    from olm_cli.evaluation.matrix import ContinualMatrix

    path = Path(run) / MATRIX_FILE
    if not path.exists():
        raise OlmError(f"{path}: no continual-learning matrix yet (set eval.sets in the recipe and train an increment)")
    matrix = ContinualMatrix.from_json(path)
    if as_json:
        sys.stdout.write(json.dumps(matrix.to_json(union), indent=2) + "\n")
    else:
        matrix.render(console, union)


def inspect_run_replay(run: Path, *, show: int, export: Path | None, as_json: bool, console: Any,
                       overwrite: bool = False) -> dict[str, Any]:
    from olm_cli.modeling import load_tokenizer
    from olm_cli.replay.inspect import find_buffer_dir, inspect_replay

    buffer_dir = find_buffer_dir(_replay_source(Path(run)))
    tokenizer = None
    if show or export:
        try:
            tokenizer = load_tokenizer(str(buffer_dir.parent))
        except OlmError:
            tokenizer = None  # previews fall back to token ids
    return inspect_replay(buffer_dir, show=show, as_json=as_json, export=export, overwrite=overwrite,
                          tokenizer=tokenizer, console=console)


def _replay_source(run: Path) -> Path:
    """Where to look for the replay snapshot, once the checkpoint holding it has been re-hashed.

    A run directory stands for its newest checkpoint that verifies (warning about any passed
    over); a checkpoint directory is verified itself, a snapshot directory through the
    checkpoint around it.
    """
    if (run / "checkpoints").is_dir() and not (run / MANIFEST_FILENAME).is_file():
        checkpoint, _ = _latest_usable(run, lambda path: None)
        if not (checkpoint / "replay").is_dir():
            raise DataError(
                f"the latest usable checkpoint of {run} ({checkpoint.name}) has no replay buffer: "
                "replay.policy is 'none' in its recipe"
            )
        return checkpoint
    for candidate in (run, run.parent):
        if (candidate / MANIFEST_FILENAME).is_file():
            _verified(candidate)
            break
    return run


def run_downstream(*, run: Path | None, checkpoint: Path | None, tasks: list[str], limit: int | None,
                   num_fewshot: int | None, batch_size: int, task_dirs: list[Path], as_json: bool,
                   console: Any) -> dict[str, dict[str, float]]:
    """``olm eval --tasks``: lm-evaluation-harness on the release (or a checkpoint), recorded in the run.

    ``--run`` measures what serving reads, ``releases/latest`` (its newest checkpoint while the
    run has no release yet); ``--checkpoint`` any model directory. A model inside a run directory
    has its results appended to that run's eval history and logged to its trackers.
    """
    import contextlib

    from olm_cli.evaluation.downstream import (
        ModelUnderTest,
        model_position,
        owning_run,
        record_downstream,
        render_downstream,
        run_tasks,
        task_manager,
    )
    from olm_cli.trackers import Trackers

    if (run is None) == (checkpoint is None):
        raise RecipeError("give exactly one of --run DIR or --checkpoint DIR")
    manager = task_manager(tasks, task_dirs)  # lm-eval installed, every task known: before a model is loaded
    if run is not None:
        run_dir: Path | None = Path(run)
        recipe = _run_recipe(Path(run))
        model_dir = _release_or_checkpoint(Path(run))
    else:
        if not Path(checkpoint).is_dir():  # type: ignore[arg-type]
            raise OlmError(f"{checkpoint}: no such checkpoint directory")
        model_dir = _verified(Path(checkpoint))  # type: ignore[arg-type]
        run_dir = owning_run(model_dir)
        recipe = _run_recipe(run_dir) if run_dir is not None else None
    increment, step = model_position(model_dir)
    target = ModelUnderTest(model_dir.resolve(), run_dir, increment, step)
    model, tokenizer = _load_model(model_dir)
    import torch

    if torch.cuda.is_available():
        model = model.to("cuda")
    trackers = Trackers.open(recipe, say=console.print) if recipe is not None else Trackers.none()
    with contextlib.closing(trackers):
        results = run_tasks(model, tokenizer, tasks, manager, limit=limit, num_fewshot=num_fewshot,
                            batch_size=batch_size)
        settings = (f"lm-eval, {'all' if limit is None else limit} examples per task, "
                    f"{'task default' if num_fewshot is None else num_fewshot} few-shot")
        record_downstream(target, results, settings=settings, trackers=trackers)
    if recipe is not None and run_dir is not None and recipe.eval.report:
        from olm_cli.report import refresh_after_increment

        # The page shows the new downstream numbers too; its one line goes to stderr (stdout may be --json).
        refresh_after_increment(run_dir, say=lambda line: sys.stderr.write(line + "\n"))
    if as_json:
        sys.stdout.write(json.dumps({"model": str(target.path), "increment": increment, "step": step,
                                     "settings": settings, "tasks": results}, indent=2) + "\n")
    else:
        render_downstream(results, console, title=f"lm-eval: {model_dir}")
        if run_dir is not None:
            console.print(f"recorded in {run_dir / 'eval' / 'history.jsonl'}", highlight=False)
    return results


def _release_or_checkpoint(run: Path) -> Path:
    """``releases/latest`` once it verifies; before the first release, the newest usable checkpoint."""
    from olm_cli.release import ReleaseStore

    store = ReleaseStore(run)
    release = store.latest_target()
    if release is not None:
        store.verify(release)
        return release
    checkpoint, _ = _latest_usable(run, lambda path: None)
    sys.stderr.write(f"note: {run} has no release yet; evaluating its latest checkpoint {checkpoint.name}\n")
    return checkpoint
