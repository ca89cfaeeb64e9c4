"""One ``olm train`` invocation: lock the run directory, decide what to train, then train it.

Deciding needs only the run directory and the shard files, so this module never imports torch:
a cron run with nothing new returns in well under two seconds, without loading the model.
The training itself (:mod:`olm_cli.engine`) is imported only when there is work.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from olm_cli.data import dataset_source, discover_shards, shard_format, validate_shard
from olm_cli.errors import EXIT_OK, CheckpointError, DataError, RecipeError
from olm_cli.recipe import Recipe
from olm_cli.rundir import CheckpointManager, RunLock, ShardLedger

TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainOutcome:
    """What one invocation did; the CLI turns it into a message and an exit code."""

    status: str  # "nothing_to_do" | "increment_complete" | "time_budget" | "interrupted"
    exit_code: int
    increment: int = 0
    steps: int = 0
    tokens: int = 0
    checkpoint: str | None = None
    message: str = ""


@dataclass
class IncrementPlan:
    """Everything decided before the model is loaded."""

    checkpoints: CheckpointManager
    latest: Path | None
    state: dict[str, Any]
    ledger: ShardLedger
    resuming: bool
    shards: list[Path] = field(default_factory=list)
    carried_state: dict[str, Any] | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def has_work(self) -> bool:
        leftover = bool(self.carried_state and self.carried_state["pending"])
        return self.resuming or bool(self.shards) or leftover


def _read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{checkpoint / TRAINER_STATE}: unreadable trainer state ({exc})") from None


def plan_increment(recipe: Recipe, say: Any = print, *, main_process: bool = True) -> IncrementPlan:
    """Decide what this invocation trains: the rest of an interrupted increment, or a new one.

    A new increment takes the data left over by the previous one (it stopped at its step budget
    inside a shard) plus the shards the ledger has not seen, validated up front so that bad files
    are quarantined with a reason instead of failing halfway through training. Under several
    processes every rank plans (they reach the same answer); only the main one writes.
    """
    run_dir = Path(recipe.run.dir)
    # Fail before training, not after an hour of it, when an eval file is missing.
    for name, path in recipe.eval.sets.items():
        if not Path(path).is_file():
            raise RecipeError(f"eval.sets.{name}: {path}: no such file")
    checkpoints = CheckpointManager(run_dir / "checkpoints", keep=recipe.run.keep_checkpoints)
    if main_process:
        checkpoints.cleanup_temp()
    choice = checkpoints.resolve_latest()
    for warning in choice.warnings:
        say(f"[yellow]warning:[/] {warning}")
    latest = choice.path
    state = _read_state(latest) if latest is not None else {}
    # The ledger inside the checkpoint is the truth: shards finished after it was written are
    # trained again from the checkpoint's data position, so none is trained twice or lost.
    ledger = ShardLedger.resume(run_dir / "ledger.json", state.get("ledger") if state else None)
    plan = IncrementPlan(checkpoints, latest, state, ledger, resuming=bool(state) and not state.get("increment_complete", True))
    if plan.resuming:
        plan.shards = [Path(p) for p in state["stream"]["shards"]]
        return plan

    carried = state.get("stream") if state else None
    carried_shards = [Path(p) for p in carried["shards"][carried["shard_index"] :]] if carried else []
    # Blocks already cut but not trained when the last increment hit its budget are kept too.
    if carried and (carried_shards or carried["pending"]):
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

    # Every shard the carried position has opened is the stream's business: its unread part is
    # in carried_shards, its read-but-untrained blocks are pending. Never plan it afresh.
    carried_set = {str(p) for p in carried["shards"]} if plan.carried_state else set()
    limit = recipe.run.max_shards_per_increment
    shards: list[Path] = list(carried_shards)
    for entry in ledger.plan(None):
        if entry.path in carried_set:
            continue
        if limit is not None and len(shards) >= limit:
            break
        path = Path(entry.path)
        try:
            validate_shard(path, shard_format(path, recipe.data.format), recipe.data.text_field)
        except DataError as exc:
            ledger.quarantine(entry.path, str(exc))
            say(f"[yellow]quarantined:[/] {exc}")
            continue
        shards.append(path)
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
        plan = plan_increment(recipe, say if is_main else (lambda *_: None), main_process=is_main)
        if not plan.has_work:
            return TrainOutcome("nothing_to_do", EXIT_OK, message="nothing to do: no new shards")
        if is_main:
            (run_dir / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        from olm_cli.engine import Trainer

        trainer = Trainer(recipe, plan, console=console)
        trainer.setup()
        return trainer.train()
    finally:
        if lock is not None:
            lock.release()
