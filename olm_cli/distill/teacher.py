"""Distillation from a fixed external teacher (a larger or earlier model with the same tokenizer)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from olm_cli.distill.base import IncrementStart, StoredLogits
from olm_cli.distill.config import DistillConfig
from olm_cli.distill.kd import check_same_vocab, freeze, kd_kl, next_token_mask, teacher_logits
from olm_cli.strategy import StrategyContext


class TeacherDistiller:
    """KL(teacher || student) at temperature T against a model loaded once, on first use.

    Loading is lazy (in :meth:`begin_increment`, or the first :meth:`loss`) so that building the
    strategy from a recipe never downloads or allocates a teacher. ``context.load_model`` loads
    it on the training device with the recipe's dtype and ``distill.trust_remote_code``.
    """

    name = "teacher"
    needs_stored_logits = False

    def __init__(self, config: DistillConfig, context: StrategyContext) -> None:
        if not config.teacher:
            raise ValueError("distill.method 'teacher' needs distill.teacher")
        if context.load_model is None:
            raise ValueError("TeacherDistiller needs context.load_model to load its teacher")
        self.source = config.teacher
        self.temperature = config.temperature
        self.trust_remote_code = config.trust_remote_code
        self._load: Callable[..., torch.nn.Module] = context.load_model
        self.teacher: torch.nn.Module | None = None

    def begin_increment(self, model: torch.nn.Module, start: IncrementStart) -> None:
        check_same_vocab(self._teacher(), model, self.source)

    def _teacher(self) -> torch.nn.Module:
        if self.teacher is None:
            self.teacher = freeze(self._load(self.source, trust_remote_code=self.trust_remote_code))
        return self.teacher

    def loss(self, student_logits: torch.Tensor, batch: dict[str, torch.Tensor],
             stored: StoredLogits | None = None) -> torch.Tensor | None:
        # kd_kl raises the same RecipeError as check_same_vocab on a vocabulary mismatch.
        return distil_from(self._teacher(), student_logits, batch, self.temperature)

    def state_dict(self) -> dict[str, Any]:
        # The teacher is fixed and reloadable from its source; nothing else to keep.
        return {"method": self.name, "teacher": self.source}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def distil_from(
    teacher: torch.nn.Module,
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """Run the frozen teacher on the batch and return the T^2-scaled KL on the scored positions."""
    t_logits = teacher_logits(teacher, batch).to(student_logits.device)
    length = student_logits.shape[1]
    mask = next_token_mask(batch, length).to(student_logits.device)
    return kd_kl(student_logits[:, :-1], t_logits[:, : length - 1], mask, temperature)
