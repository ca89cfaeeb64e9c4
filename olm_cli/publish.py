"""After an increment: evaluate every domain, then publish the release behind the gate.

One path for both ways an increment ends: right after its final checkpoint (the engine), and on
the next run when a crash came between that checkpoint and its release (``olm train`` finds the
release missing and calls :func:`publish_pending_release`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from olm_cli.recipe import Recipe
from olm_cli.rundir.checkpoint import loading_checkpoint
from olm_cli.trackers import Trackers


def evaluate_and_release(recipe: Recipe, model: torch.nn.Module, tokenizer: Any, *, increment: int, step: int,
                         checkpoint: Path, trained: dict[str, int], tokens_trained: int,
                         state_dict: Any = None, console: Any = None, trackers: Any = None,
                         origin: dict[str, Any] | None = None) -> Any:
    """Evaluate every domain (a row of the matrix), then publish the increment's release behind the gate.

    ``origin`` says where the weights came from when they are not the trunk's (a cooldown, an
    average; :mod:`olm_cli.release_branch`); the release records it.
    Returns the :class:`~olm_cli.release.ReleaseResult`, or None when releases are off. Also used
    when a run died between an increment's checkpoint and its release (see
    :func:`publish_pending_release`), so both paths publish exactly the same way.
    """
    from olm_cli.evaluation.domains import record_increment_eval
    from olm_cli.release import publish_release

    run_dir = Path(recipe.run.dir)
    results = None
    if recipe.eval.after_increment and recipe.eval.sets:
        if console is not None:
            console.print(f"evaluating {len(recipe.eval.sets)} domain(s) after increment {increment}")
        results = record_increment_eval(run_dir, recipe, model, tokenizer, increment=increment, trained=trained,
                                        step=step, console=console, trackers=trackers)
    result = None
    if recipe.release.enabled:
        result = publish_release(run_dir, recipe, model, tokenizer, increment=increment, step=step,
                                 checkpoint=checkpoint, eval_results=results, tokens_trained=tokens_trained,
                                 state_dict=state_dict, origin=origin)
        # A refusal is the caller's last line (and exit code 3); a release is reported here.
        if console is not None and result.released:
            console.print(result.message, highlight=False)
    if recipe.eval.report:  # last: the page shows this increment's eval and gate verdict
        from olm_cli.report import refresh_after_increment

        refresh_after_increment(run_dir, say=_plain_line(console))
    return result


def _plain_line(console: Any) -> Any:
    if console is None:
        return None
    return lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True)


def publish_pending_release(recipe: Recipe, checkpoint: Path, state: dict[str, Any], console: Any = None) -> Any:
    """Finish an increment whose checkpoint is complete but whose release was never attempted.

    A crash (or a full disk) between the final checkpoint and the release would otherwise leave
    serving on the previous release for good: the next run finds nothing new and exits 0.
    """
    from olm_cli.modeling import load_pretrained, load_tokenizer

    if console is not None:
        console.print(f"increment {state['increment']} was checkpointed ({checkpoint.name}) but not released; "
                      "evaluating and releasing it now")
    with loading_checkpoint(checkpoint, "the model or tokenizer"):
        model = load_pretrained(str(checkpoint), dtype=recipe.model.dtype)
        tokenizer = load_tokenizer(str(checkpoint))
    if torch.cuda.is_available():
        model = model.to("cuda")
    origin = None
    if recipe.release.merge == "sma":
        from olm_cli.release_branch import average_trunk, release_origin, trunk_eval
        from olm_cli.rundir import CheckpointManager

        checkpoints = CheckpointManager(checkpoint.parent, keep=recipe.run.keep_checkpoints)
        say_line = console.print if console is not None else (lambda *_: None)
        trunk_losses = trunk_eval(recipe, model, tokenizer, say_line)
        averaged = average_trunk(recipe, checkpoints, checkpoint, model, say_line)
        origin = release_origin("sma", checkpoint, averaged=averaged, trunk_losses=trunk_losses)
    say = console.print if console is not None else None
    with contextlib.closing(Trackers.open(recipe, say=say)) as trackers:
        return evaluate_and_release(recipe, model, tokenizer, increment=int(state["increment"]),
                                    step=int(state["global_step"]), checkpoint=checkpoint,
                                    trained=dict(state.get("domain_tokens", {})),
                                    tokens_trained=int(state.get("total_tokens", 0)), console=console,
                                    trackers=trackers, origin=origin)
