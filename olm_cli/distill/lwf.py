"""Learning without Forgetting: the teacher is the model as it was when the increment began."""

from __future__ import annotations

import copy

import torch

from olm_cli.distill.base import StoredLogits
from olm_cli.distill.kd import freeze
from olm_cli.distill.teacher import distil_from


class LwfDistiller:
    """Distils from a frozen deep copy of the student taken in :meth:`begin_increment`.

    The copy costs one extra model in memory (on the student's device) and one extra forward
    pass per step, but needs no stored data: new text is labelled by the old model's beliefs,
    which pulls the student back toward what it predicted before the increment.
    """

    name = "lwf"

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.teacher: torch.nn.Module | None = None
        self.snapshots = 0

    def begin_increment(self, model: torch.nn.Module) -> None:
        # Drop the old snapshot first so two copies never coexist with the student.
        self.teacher = None
        self.teacher = freeze(copy.deepcopy(model))
        self.snapshots += 1

    def loss(
        self,
        student_logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        stored: StoredLogits | None = None,
    ) -> torch.Tensor | None:
        if self.teacher is None:
            raise RuntimeError(
                "LwfDistiller.loss called before begin_increment: the engine must snapshot the "
                "model (begin_increment) at the start of every increment, including a resumed one"
            )
        return distil_from(self.teacher, student_logits, batch, self.temperature)

    def state_dict(self) -> dict:
        # The snapshot equals the checkpoint the increment started from, which the run directory
        # already holds; resuming mid-increment re-snapshots via begin_increment on that model.
        return {"method": self.name, "snapshots": self.snapshots}

    def load_state_dict(self, state: dict) -> None:
        self.snapshots = int(state.get("snapshots", 0))
