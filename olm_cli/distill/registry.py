"""Recipe names -> strategy classes, and the two builders the engine calls."""

from __future__ import annotations

from collections.abc import Callable

import torch

from olm_cli.distill.base import Distiller, Regularizer
from olm_cli.distill.config import DistillConfig, RegularizeConfig
from olm_cli.distill.ewc import EwcRegularizer
from olm_cli.distill.l2 import L2Regularizer
from olm_cli.distill.lwf import LwfDistiller
from olm_cli.distill.stored_logits import StoredLogitsDistiller
from olm_cli.distill.teacher import TeacherDistiller
from olm_cli.errors import RecipeError

DISTILLERS: dict[str, type] = {
    "teacher": TeacherDistiller,
    "lwf": LwfDistiller,
    "stored_logits": StoredLogitsDistiller,
}
REGULARIZERS: dict[str, type] = {"ewc": EwcRegularizer, "l2": L2Regularizer}


def build_distiller(
    cfg: DistillConfig, *, load_teacher: Callable[[str], torch.nn.Module]
) -> Distiller | None:
    """The distiller the recipe asks for, or None for ``method: none``.

    ``load_teacher`` comes from the engine because only it knows devices, dtypes and
    ``trust_remote_code``; it is called lazily, at the first ``begin_increment``.
    """
    if cfg.method == "none":
        return None
    if cfg.method == "teacher":
        if not cfg.teacher:
            raise RecipeError("distill.teacher is required when distill.method is 'teacher'")
        return TeacherDistiller(cfg.teacher, cfg.temperature, load_teacher)
    if cfg.method == "lwf":
        return LwfDistiller(cfg.temperature)
    if cfg.method == "stored_logits":
        return StoredLogitsDistiller(cfg.temperature, cfg.topk)
    raise RecipeError(f"unknown distill.method {cfg.method!r}; choose from {sorted(DISTILLERS)}")


def build_regularizer(cfg: RegularizeConfig) -> Regularizer | None:
    """The weight-space regulariser the recipe asks for, or None for ``method: none``."""
    if cfg.method == "none":
        return None
    if cfg.method == "ewc":
        return EwcRegularizer(cfg.strength, cfg.fisher_batches, cfg.fisher_decay)
    if cfg.method == "l2":
        return L2Regularizer(cfg.strength)
    raise RecipeError(
        f"unknown regularize.method {cfg.method!r}; choose from {sorted(REGULARIZERS)}"
    )
