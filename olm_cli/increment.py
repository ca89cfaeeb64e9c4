"""One ``olm train`` invocation: lock the run directory, decide what to train, then train it.

Deciding needs only the run directory and the shard files, so this module never imports torch:
a cron run with nothing new returns in well under two seconds, without loading the model.
The training itself (:mod:`olm_cli.engine`) is imported only when there is work.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from rich.markup import escape

from olm_cli.data import (
    check_shard,
    dataset_source,
    discover_shards,
    position_has_work,
    position_owned_shards,
    position_unread_shards,
    shard_format,
)
from olm_cli.errors import (
    EXIT_NOT_RELEASED,
    EXIT_OK,
    CheckpointError,
    CheckpointLoadError,
    DataError,
    RecipeError,
)
from olm_cli.pipeline import buffered_shards
from olm_cli.recipe import Recipe
from olm_cli.release import HISTORY_FILENAME, RELEASES_DIR
from olm_cli.run_state import TRAINER_STATE, IncrementPlan, TrainOutcome
from olm_cli.rundir import CheckpointManager, GracefulStop, RunLock, ShardLedger
from olm_cli.rundir.atomic import write_text_atomic
from olm_cli.rundir.checkpoint import CheckpointFallback, CheckpointVerifyError


def _read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bad UTF-8
        raise CheckpointLoadError(checkpoint, f"{TRAINER_STATE} is unreadable ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointLoadError(checkpoint, f"{TRAINER_STATE} is not a JSON object")
    return state


def _checkpoint_fallback(recipe: Recipe) -> CheckpointFallback:
    return CheckpointFallback(CheckpointManager(Path(recipe.run.dir) / "checkpoints", keep=recipe.run.keep_checkpoints))


def _resume_point(run_dir: Path, fallback: CheckpointFallback) -> tuple[Path | None, dict[str, Any], ShardLedger]:
    """The checkpoint to continue from, its trainer state and the ledger that matches its weights.

    Chosen with the cheap size check (plus a re-hash of the small trainer state, which decides
    what to train); a checkpoint whose state cannot be read is passed over for an older one.
    When checkpoints exist but none is usable, starting from scratch would silently train again
    every shard they hold, so that is an error, not a fresh start.
    """
    while True:
        latest = fallback.choose(hashed=(TRAINER_STATE,))
        if latest is None:
            if fallback.rejected:  # one error naming each checkpoint and its reason
                raise fallback.none_usable(
                    "Starting from the base model would train every shard again; restore a checkpoint, "
                    f"or move {fallback.manager.root} aside to start over on purpose"
                )
            return None, {}, ShardLedger.resume(run_dir / "ledger.json", None)
        try:
            state = _read_state(latest)
            # The ledger inside the checkpoint is the truth: shards finished after it was written
            # are trained again from the checkpoint's data position, so none is trained twice or lost.
            return latest, state, ShardLedger.resume(run_dir / "ledger.json", state.get("ledger"))
        except CheckpointError as exc:
            fallback.reject(latest, getattr(exc, "reason", str(exc)))


def plan_increment(recipe: Recipe, say: Any = print, *, main_process: bool = True,
                   fallback: CheckpointFallback | None = None) -> IncrementPlan:
    """Decide what this invocation trains: the rest of an interrupted increment, or a new one.

    A new increment takes the data left over by the previous one (it stopped at its step budget
    inside a shard) plus the shards the ledger has not seen, checked cheaply up front (the head
    of each file, a parquet footer) so that unusable files are quarantined with a reason before
    training; a bad record further in is found, and quarantined, while training reads it. Under several
    processes every rank plans (they reach the same answer); only the main one writes.
    ``fallback`` carries the checkpoints an earlier attempt found unusable (see run_increment);
    the caller reports them (``fallback.warnings()``) once its choice has loaded.
    """
    run_dir = Path(recipe.run.dir)
    # Fail before training, not after an hour of it, when an eval file is missing.
    for name, path in recipe.eval.sets.items():
        if not Path(path).is_file():
            raise RecipeError(f"eval.sets.{name}: {path}: no such file")
    fallback = fallback or _checkpoint_fallback(recipe)
    checkpoints = fallback.manager
    if main_process:
        checkpoints.cleanup_temp()
    latest, state, ledger = _resume_point(run_dir, fallback)
    plan = IncrementPlan(checkpoints, latest, state, ledger, resuming=bool(state) and not state.get("increment_complete", True))
    if plan.resuming:
        plan.shards = [Path(p) for p in state["stream"]["shards"]]
        return plan

    carried = state.get("stream") if state else None
    carried_shards = [Path(p) for p in position_unread_shards(carried)] if carried else []
    # Blocks already cut (or tokens in the carry) when the last increment hit its budget are kept too.
    if carried and position_has_work(carried):
        plan.carried_state = carried
    if recipe.data.dataset:
        # A streamed dataset is one endless source: continue from the saved position.
        plan.shards = [dataset_source(recipe.data.dataset, recipe.data.dataset_split)]
        if carried and not carried_shards:
            plan.shards = []  # the dataset was read to its end by an earlier increment
        return plan

    found = discover_shards(recipe.data.shards, allow_empty=recipe.data.allow_empty)
    scan = ledger.scan(found, retrain_changed=recipe.run.retrain_changed)
    for entry in scan.changed:
        say(f"[yellow]warning:[/] {entry.path} changed after it was trained; skipped (set run.retrain_changed: true to train it again)")
    for entry in scan.duplicates:
        say(f"[yellow]skipped:[/] {entry.path}: {entry.reason}")
    for entry in scan.unreadable:
        say(f"[yellow]quarantined:[/] {entry.path}: {entry.reason}")
    for entry in scan.missing:
        say(f"[yellow]warning:[/] {entry.path} is queued but its file is gone")

    # Every shard the carried position still has tokens of is the stream's business: its unread
    # part is in carried_shards, its read-but-untrained tokens are in the carry, cut blocks or the
    # shuffle buffer (a tail can wait there for several increments). Never plan it afresh.
    carried = plan.carried_state
    carried_set = set(position_owned_shards(carried)) | buffered_shards(carried) if carried else set()
    limit = recipe.run.max_shards_per_increment
    shards: list[Path] = list(carried_shards)
    for entry in ledger.plan(None):
        if entry.path in carried_set:
            continue
        if limit is not None and len(shards) >= limit:
            break
        shard = Path(entry.path)
        try:
            # A few kilobytes per shard; a bad record further in quarantines the rest of its
            # shard when training reads it (docs/run-directory.md, "Bad records").
            check_shard(shard, shard_format(shard, recipe.data.format), recipe.data.text_field)
        except DataError as exc:
            ledger.quarantine(entry.path, str(exc))
            say(f"[yellow]quarantined:[/] {exc}")
            continue
        shards.append(shard)
    if main_process:
        ledger.save()
    plan.shards = shards
    return plan


def run_increment(recipe: Recipe, *, console: Any = None) -> TrainOutcome:
    """Entry point of ``olm train``: lock, plan, and (only if there is work) train one increment."""
    run_dir = Path(recipe.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *_: None)
    # Under torchrun every rank runs this; rank 0 alone holds the lock and writes the ledger.
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = RunLock(run_dir) if is_main else None
    if lock is not None:
        lock.acquire()
    try:
        if lock is not None and lock.stale_message:
            say(f"[yellow]warning:[/] {lock.stale_message}")
        main_say = say if is_main else (lambda *_: None)
        fallback = _checkpoint_fallback(recipe)
        # A signal during set-up (GGUF conversion, counting blocks, the row-0 eval) stops cleanly too.
        with GracefulStop() as stop:
            while True:  # until a checkpoint loads, or none is left (plan_increment raises)
                plan = plan_increment(recipe, main_say, main_process=is_main, fallback=fallback)
                released = None
                # A cooldown branch (wsd) trains: every rank takes part and rank 0 writes; any other
                # pending release is written by rank 0 alone.
                if (is_main or recipe.optim.schedule == "wsd") and release_pending(recipe, plan):
                    released = _publish_pending(recipe, plan, fallback, console, main_say, stop)
                    if released is None:
                        continue  # the checkpoint was rejected; plan again without it
                    if isinstance(released, TrainOutcome):
                        return released  # a signal stopped the cooldown again (checkpointed)
                if released is not None and not released.released and plan.has_work:
                    main_say(f"[yellow]warning:[/] {escape(released.message)}")
                if not plan.has_work:
                    _report_fallback(fallback, main_say)
                    if released is not None and not released.released:
                        return TrainOutcome("not_released", EXIT_NOT_RELEASED, plan.state.get("increment", 0),
                                            message=released.message)
                    return TrainOutcome("nothing_to_do", EXIT_OK, message="nothing to do: no new shards")
                if is_main:
                    write_text_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
                trainer = _load_trainer(recipe, plan, fallback, console, main_say, stop)
                if trainer is not None:
                    # No checkpoint write still in flight when the lock is released; trackers flushed on every exit.
                    with contextlib.closing(trainer.trackers), trainer.checkpoint_writes():
                        return trainer.train()
    finally:
        if lock is not None:
            lock.release()


def _report_fallback(fallback: CheckpointFallback, say: Any) -> None:
    for warning in fallback.warnings():
        say(f"[yellow]warning:[/] {warning}")


def release_pending(recipe: Recipe, plan: IncrementPlan) -> bool:
    """Whether the latest checkpoint finished an increment whose release was never attempted.

    Torch-free and cheap (the release history has one line per increment), so a "nothing to
    do" night stays fast. An attempt for this or a later increment (the latter after a fallback
    to an older checkpoint) counts: a release is never re-published backwards.
    """
    if not recipe.release.enabled or plan.latest is None or plan.resuming or not plan.state.get("increment_complete"):
        return False
    increment = int(plan.state.get("increment", 0))
    history = Path(recipe.run.dir) / RELEASES_DIR / HISTORY_FILENAME
    try:
        lines = history.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # unreadable history: olm status reports it; never re-publish blindly
    for line in lines:
        try:
            if int(json.loads(line).get("increment", -1)) >= increment:
                return False
        except (ValueError, TypeError, AttributeError):
            continue  # a line cut by a crash
    return True


def _publish_pending(recipe: Recipe, plan: IncrementPlan, fallback: CheckpointFallback, console: Any, say: Any,
                     stop: Any = None) -> Any:
    """Release the increment a crash left checkpointed but unreleased; None if the checkpoint is unusable.

    Under ``optim.schedule: wsd`` the release is a cooldown branch: the engine sets up from the
    trunk checkpoint and trains (or continues) it first; a signal then returns a TrainOutcome.
    """
    from olm_cli.publish import publish_pending_release

    assert plan.latest is not None
    try:
        plan.checkpoints.verify(plan.latest, deep=True)
        _report_fallback(fallback, say)
        if recipe.optim.schedule == "wsd":
            from olm_cli.engine import Trainer

            trainer = Trainer(recipe, plan, console=console, stop=stop)
            trainer.setup_pending_release()
            return trainer.finish_pending_release()
        return publish_pending_release(recipe, plan.latest, plan.state, console=console)
    except (CheckpointVerifyError, CheckpointLoadError) as exc:
        fallback.reject(plan.latest, exc.reason)
        return None


def _load_trainer(recipe: Recipe, plan: IncrementPlan, fallback: CheckpointFallback, console: Any, say: Any,
                  stop: Any = None) -> Any:
    """A set-up Trainer, or None after rejecting ``plan.latest`` because it cannot be used.

    Planning trusted the cheap check; before any of the checkpoint's weights, optimizer or
    state is trained on, every file is re-hashed against the manifest, and the engine reports
    a checkpoint that verifies but does not load as CheckpointLoadError. Checkpoints passed
    over are reported once the one chosen instead has verified.
    """
    from olm_cli.engine import Trainer

    try:
        if plan.latest is not None:
            plan.checkpoints.verify(plan.latest, deep=True)
        _report_fallback(fallback, say)
        trainer = Trainer(recipe, plan, console=console, stop=stop)
        try:
            trainer.setup()
        except BaseException:
            trainer.trackers.close()  # a fallback's Trainer starts its own
            raise
    except (CheckpointVerifyError, CheckpointLoadError) as exc:
        if plan.latest is None:
            raise
        fallback.reject(plan.latest, exc.reason)
        return None
    return trainer
