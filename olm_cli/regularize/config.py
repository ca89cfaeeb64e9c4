"""Recipe section ``regularize``: weight-space penalties toward the previous increment's solution."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field

from olm_cli.config_base import StrategySection, for_strategies
from olm_cli.regularize.registry import REGULARIZERS
from olm_cli.strategy import Registry

PENALISING_METHODS = ("ewc", "l2")
"""Methods that add a weight-space penalty (everything but ``none``)."""


class RegularizeConfig(StrategySection):
    """Weight-space penalties that keep parameters near the previous increment's solution."""

    strategy_registry: ClassVar[Registry[Any]] = REGULARIZERS
    strategy_key: ClassVar[str] = "method"
    strategy_kind: ClassVar[tuple[str, str]] = ("regularize method", "regularize methods")

    method: Annotated[str, AfterValidator(REGULARIZERS.check)] = Field(
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
