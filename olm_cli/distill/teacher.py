"""Distillation from a fixed external teacher (a larger or earlier model with the same tokenizer)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from olm_cli.distill.base import StoredLogits
from olm_cli.distill.kd import check_same_vocab, freeze, kd_kl, next_token_mask, teacher_logits


class TeacherDistiller:
    """KL(teacher || student) at temperature T against a model loaded once, on first use.

    Loading is lazy (in :meth:`begin_increment`) so that building the strategy from a recipe, e.g.
    for ``olm validate``, never downloads or allocates a teacher.
    """

    name = "teacher"

    def __init__(
        self,
        source: str,
        temperature: float,
        load_teacher: Callable[[str], torch.nn.Module],
    ) -> None:
        self.source = source
        self.temperature = temperature
        self._load_teacher = load_teacher
        self.teacher: torch.nn.Module | None = None

    def begin_increment(self, model: torch.nn.Module) -> None:
        if self.teacher is None:
            self.teacher = freeze(self._load_teacher(self.source))
        check_same_vocab(self.teacher, model, self.source)

    def loss(
        self,
        student_logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        stored: StoredLogits | None = None,
    ) -> torch.Tensor | None:
        if self.teacher is None:
            # A resumed increment may skip begin_increment; the vocabulary is then checked on
            # the logits themselves (kd_kl raises the same RecipeError on a size mismatch).
            self.teacher = freeze(self._load_teacher(self.source))
        return distil_from(self.teacher, student_logits, batch, self.temperature)

    def state_dict(self) -> dict:
        # The teacher is fixed and reloadable from its source; nothing else to keep.
        return {"method": self.name, "teacher": self.source}

    def load_state_dict(self, state: dict) -> None:
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
