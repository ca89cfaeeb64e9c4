"""Shapes shared by the planner (:mod:`olm_cli.increment`) and the engine (:mod:`olm_cli.engine`).

They live apart from both so that the engine never imports the planner: planning stays
torch-free, and the dependency runs one way (increment -> engine, lazily, when there is work).
"""

from __future__ import annotations

import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from olm_cli.rundir import CheckpointManager, ShardLedger

TRAINER_STATE = "trainer_state.json"
"""The file in every checkpoint that holds :class:`TrainerState` (JSON)."""


@dataclass
class TrainerState:
    """Every counter and position a checkpoint saves and a resume restores, in one place.

    Serialised as ``trainer_state.json``; the keys are the field names, so checkpoints written
    before this class existed load unchanged (missing keys take the defaults).
    """

    increment: int = 0
    increment_complete: bool = True
    step: int = 0  # optimizer steps in this increment
    horizon: int = 1  # schedule length of this increment, in steps
    global_step: int = 0  # optimizer steps since the run began (checkpoint names)
    tokens: int = 0  # tokens trained in this increment (new + replay)
    new_blocks: int = 0  # new blocks taken from the stream in this increment (replay.mode: displace plans on them)
    total_tokens: int = 0
    unselected: int = 0  # blocks the selector passed over, since the run began
    domain_tokens: dict[str, int] = field(default_factory=dict)  # new tokens per domain, this increment
    stream: dict[str, Any] | None = None  # the block stream's position
    ledger: dict[str, Any] | None = None  # the shard ledger as of this state (authoritative on resume)
    shard_plan: list[str] = field(default_factory=list)
    host: str = ""
    saved_at: float = 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainerState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stamped(self) -> dict[str, Any]:
        """The dict to save, with the host and time of saving."""
        return {**self.to_dict(), "host": socket.gethostname(), "saved_at": time.time()}


@dataclass
class TrainOutcome:
    """What one invocation did; the CLI turns it into a message and an exit code."""

    status: str  # "nothing_to_do" | "increment_complete" | "not_released" | "time_budget" | "interrupted"
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
        from olm_cli.data import position_has_work

        leftover = position_has_work(self.carried_state)
        return self.resuming or bool(self.shards) or leftover
