"""Reporting commands (``olm eval``, ``olm replay-inspect``) that read a run directory.

Kept out of ``cli.py`` so the CLI stays argument parsing only, and out of ``engine.py`` because
they never train.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from olm_cli.errors import OlmError, RecipeError
from olm_cli.evaluate import MATRIX_FILE, evaluate_domains, render_results


def _run_recipe(run: Path) -> Any:
    from olm_cli.recipe import load_recipe

    path = Path(run) / "recipe.yaml"
    if not path.exists():
        raise OlmError(f"{run}: not an olm run directory (no recipe.yaml); run `olm train` first")
    return load_recipe(path)


def _latest_checkpoint(run: Path) -> Path:
    from olm_cli.rundir import CheckpointManager

    latest = CheckpointManager(Path(run) / "checkpoints").latest()
    if latest is None:
        raise OlmError(f"{run}: no complete checkpoint yet")
    return latest


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
    from olm_cli.modeling import load_pretrained, load_tokenizer

    if (run is None) == (checkpoint is None):
        raise RecipeError("give exactly one of --run DIR or --checkpoint DIR")
    recipe = _run_recipe(run) if run is not None else None
    model_dir = _latest_checkpoint(run) if run is not None else Path(checkpoint)  # type: ignore[arg-type]
    if not model_dir.is_dir():
        raise OlmError(f"{model_dir}: no such checkpoint directory")
    sets = data or (recipe.eval.sets if recipe is not None else {})
    if not sets:
        raise RecipeError("nothing to evaluate: pass --data NAME=PATH (or a run whose recipe has eval.sets)")
    for name, path in sets.items():
        if not Path(path).is_file():
            raise OlmError(f"{path}: eval file for domain {name!r} not found")
    model = load_pretrained(str(model_dir))
    tokenizer = load_tokenizer(str(model_dir))
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

    buffer_dir = find_buffer_dir(Path(run))
    tokenizer = None
    if show or export:
        try:
            tokenizer = load_tokenizer(str(buffer_dir.parent))
        except OlmError:
            tokenizer = None  # previews fall back to token ids
    return inspect_replay(buffer_dir, show=show, as_json=as_json, export=export, overwrite=overwrite,
                          tokenizer=tokenizer, console=console)
