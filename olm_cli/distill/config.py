"""Recipe sections for the forgetting countermeasures: ``distill`` and ``regularize`` (``train`` is in olm_cli/partial).

They live together because they answer one question -- how much may the model move away from
what it already knows -- and the engine reads them side by side when it builds the loss.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from olm_cli.config_base import StrategySection, for_strategies

DISTILLING_METHODS = ("teacher", "lwf", "stored_logits")
"""Methods that add a distillation term (everything but ``none``)."""
PENALISING_METHODS = ("ewc", "l2")
"""Methods that add a weight-space penalty (everything but ``none``)."""


class DistillConfig(StrategySection):
    """Knowledge distillation: pull the student toward a teacher's output distribution."""

    strategy_key: ClassVar[str] = "method"
    strategy_kind: ClassVar[tuple[str, str]] = ("distill method", "distill methods")

    method: Literal["none", "teacher", "lwf", "stored_logits"] = Field(
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


class RegularizeConfig(StrategySection):
    """Weight-space penalties that keep parameters near the previous increment's solution."""

    strategy_key: ClassVar[str] = "method"
    strategy_kind: ClassVar[tuple[str, str]] = ("regularize method", "regularize methods")

    method: Literal["none", "ewc", "l2"] = Field(
        default="none",
        description=(
            "none: no penalty. ewc: Elastic Weight Consolidation, lambda/2 * sum F (theta - "
            "theta*)^2 with a diagonal Fisher F. l2: lambda/2 * sum (theta - theta*)^2."
        ),
    )
    strength: float = Field(
        default=1.0,
        json_schema_extra=for_strategies(*PENALISING_METHODS),
        ge=0.0,
        description="lambda, the penalty weight added to the loss.",
    )
    fisher_batches: int = Field(
        default=8,
        json_schema_extra=for_strategies("ewc"),
        ge=1,
        description="ewc: number of batches used to estimate the Fisher at the end of an increment.",
    )
    fisher_decay: float = Field(
        default=1.0,
        json_schema_extra=for_strategies("ewc"),
        ge=0.0,
        le=1.0,
        description=(
            "ewc: F <- decay * F_old + F_new after each increment. 1.0 sums the Fisher of every "
            "increment (classic multi-task EWC); below 1 older increments fade (online EWC); "
            "0 keeps only the newest."
        ),
    )

