"""Recipe section ``distill``: which teacher the student is pulled toward, and how hard.

Weight-space regularisers are ``regularize`` (:mod:`olm_cli.regularize.config`); partial
updates and LoRA are ``train`` (:mod:`olm_cli.partial.config`).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field, model_validator

from olm_cli.config_base import StrategySection, for_strategies
from olm_cli.distill.registry import DISTILLERS
from olm_cli.strategy import Registry

DISTILLING_METHODS = ("teacher", "lwf", "stored_logits")
"""Methods that add a distillation term (everything but ``none``)."""


class DistillConfig(StrategySection):
    """Knowledge distillation: pull the student toward a teacher's output distribution."""

    strategy_registry: ClassVar[Registry[Any]] = DISTILLERS
    strategy_key: ClassVar[str] = "method"
    strategy_kind: ClassVar[tuple[str, str]] = ("distill method", "distill methods")

    method: Annotated[str, AfterValidator(DISTILLERS.check)] = Field(
        default="none",
        description=(
            "none: plain cross-entropy. teacher: distil from a fixed external model (`teacher`). "
            "lwf: Learning without Forgetting, the teacher is a frozen copy of the model taken at "
            "the start of each increment. stored_logits: replayed samples carry the top-k logits "
            "recorded when they entered the replay buffer (DER-style)."
        ),
    )
    teacher: str | None = Field(
        default=None,
        json_schema_extra=for_strategies("teacher"),
        description="Hub id, local directory or checkpoint of the teacher; required for method teacher.",
    )
    alpha: float = Field(
        default=0.5,
        json_schema_extra=for_strategies(*DISTILLING_METHODS),
        ge=0.0,
        le=1.0,
        description="Weight of the cross-entropy term; the distillation term gets 1 - alpha.",
    )
    temperature: float = Field(
        default=2.0,
        json_schema_extra=for_strategies(*DISTILLING_METHODS),
        gt=0.0,
        description="Softmax temperature T for both distributions; the KL term is scaled by T^2.",
    )
    topk: int = Field(
        default=16,
        json_schema_extra=for_strategies("stored_logits"),
        ge=1,
        description="stored_logits: how many logits per position are kept with each replay sample.",
    )
    trust_remote_code: bool = Field(
        default=False,
        json_schema_extra=for_strategies("teacher"),
        description="Passed to from_pretrained when loading the teacher.",
    )

    @model_validator(mode="after")
    def _teacher_needs_a_source(self) -> DistillConfig:
        if self.method == "teacher" and not self.teacher:
            raise ValueError("distill.method 'teacher' needs distill.teacher (hub id or directory)")
        return self

