"""Learning without Forgetting: the teacher is the model as it was when the increment began."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from olm_cli.distill.base import IncrementStart, StoredLogits
from olm_cli.distill.config import DistillConfig
from olm_cli.distill.kd import freeze
from olm_cli.distill.teacher import distil_from
from olm_cli.strategy import StrategyContext

log = logging.getLogger(__name__)

START_DIR = "increment-start"
"""``RUN/increment-start/``: the weights the current increment began from (for a resume)."""


class LwfDistiller:
    """Distils from a frozen deep copy of the student taken in :meth:`begin_increment`.

    The copy costs one extra model in memory (on the student's device) and one extra forward
    pass per step, but needs no stored data: new text is labelled by the old model's beliefs,
    which pulls the student back toward what it predicted before the increment.

    The start model is this part's own state: the main process keeps it in
    ``RUN/increment-start/`` so that a resumed increment distils from the same teacher, not from
    the weights at the resume. While the model is a random initialisation (the first increment
    of a from-scratch run) there is nothing to preserve, and LwF is off with a note.
    """

    name = "lwf"
    needs_stored_logits = False

    def __init__(self, config: DistillConfig, context: StrategyContext) -> None:
        self.temperature = config.temperature
        self.start_dir = Path(context.run_dir) / START_DIR if context.run_dir is not None else None
        self.is_main = context.is_main
        self._load: Callable[..., torch.nn.Module] | None = context.load_model
        self._say = context.say
        self.teacher: torch.nn.Module | None = None
        self.snapshots = 0

    def begin_increment(self, model: torch.nn.Module, start: IncrementStart) -> None:
        self.teacher = None  # drop the old snapshot first so two copies never coexist with the student
        if start.from_random_init:
            self._say(f"note: distill.method lwf is off in increment {start.increment}: the model starts from "
                      "a random initialisation, so there is nothing to preserve yet")
            return
        restored = self._restore(start.increment) if start.resuming else None
        self.teacher = freeze(restored if restored is not None else copy.deepcopy(model))
        if not start.resuming:
            self.snapshots += 1
            if self.is_main:
                self._keep(model, start.increment)

    def loss(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor],
             stored: StoredLogits | None = None) -> torch.Tensor | None:
        if self.teacher is None:
            return None  # off while the start model is a random initialisation
        return distil_from(self.teacher, student_logits, batch, self.temperature)

    def _keep(self, model: torch.nn.Module, increment: int) -> None:
        """Write the start model next to the run's checkpoints, complete or not at all."""
        from olm_cli.partial import model_for_save
        from olm_cli.rundir.atomic import publishing_directory

        if self.start_dir is None:
            return
        with publishing_directory(self.start_dir) as staged:
            model_for_save(model).save_pretrained(staged, safe_serialization=True)
            (staged / "increment.json").write_text(json.dumps({"increment": increment}), encoding="utf-8")

    def _restore(self, increment: int) -> torch.nn.Module | None:
        if self.start_dir is None or self._load is None:
            return None
        try:
            kept = json.loads((self.start_dir / "increment.json").read_text(encoding="utf-8"))["increment"]
        except (OSError, ValueError, KeyError, TypeError):
            kept = None
        if kept != increment:
            log.warning("no saved start-of-increment model; LwF distils from the resumed weights")
            return None
        return self._load(str(self.start_dir))

    def state_dict(self) -> dict[str, Any]:
        # The snapshot itself lives in RUN/increment-start (a model, too big for a state tree).
        return {"method": self.name, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshots = int(state.get("snapshots", 0))
