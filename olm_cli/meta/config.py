"""Recipe section ``optim.meta``: an outer update wrapped around the optimiser's inner steps."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, Field

from olm_cli.config_base import StrategySection, for_strategies
from olm_cli.meta.registry import META_UPDATES
from olm_cli.strategy import Registry


class MetaConfig(StrategySection):
    """First-order meta-learning around AdamW: the weights move only part of the way the inner steps went."""

    strategy_registry: ClassVar[Registry[Any]] = META_UPDATES
    strategy_key: ClassVar[str] = "method"
    strategy_kind: ClassVar[tuple[str, str]] = ("optim.meta method", "optim.meta methods")

    method: Annotated[str, AfterValidator(META_UPDATES.check)] = Field(
        default="none",
        description=(
            "none: every optimiser step is final. reptile: Reptile (arXiv:1803.02999), every "
            "`inner_steps` optimiser steps the weights become theta_0 + outer_lr * (theta_k - theta_0), "
            "theta_0 being the weights the window started from (docs/meta.md)."
        ),
    )
    inner_steps: int = Field(
        default=8,
        json_schema_extra=for_strategies("reptile"),
        ge=1,
        description="reptile: k, optimiser steps per outer update (the increment's last window may be shorter).",
    )
    outer_lr: float = Field(
        default=0.5,
        json_schema_extra=for_strategies("reptile"),
        gt=0.0,
        le=1.0,
        description="reptile: epsilon, the fraction of the k inner steps' displacement that is kept (1.0: plain training).",
    )
