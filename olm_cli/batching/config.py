"""Recipe section ``batch``: how many samples make one optimizer step, and how they are split."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from olm_cli.batching.registry import BATCH_POLICIES
from olm_cli.config_base import StrategySection, for_strategies
from olm_cli.strategy import Registry

SIZE_CHOOSING_POLICIES = ("adaptive", "uncertainty", "periodic")
"""Policies that choose the effective batch themselves, within [min_size, max_size]; fixed and
resource always train ``size`` samples."""


class BatchConfig(StrategySection):
    """Effective batch (samples per optimizer step) and micro-batch (samples per forward).

    Accumulation steps are ``ceil(samples / micro_batch)``, so changing the micro-batch (e.g.
    after an out-of-memory error) never changes what one optimizer step means.
    """

    strategy_registry: ClassVar[Registry[Any]] = BATCH_POLICIES
    strategy_key: ClassVar[str] = "policy"
    strategy_kind: ClassVar[tuple[str, str]] = ("batch policy", "batch policies")

    policy: Annotated[str, AfterValidator(BATCH_POLICIES.check)] = Field(
        default="fixed",
        description=(
            "fixed: always `size`. adaptive: grow/shrink from the loss trend or the gradient "
            "noise scale. uncertainty: larger batches when the pool's mean entropy is high. "
            "resource: largest micro-batch that fits memory, backing off on OOM. periodic: "
            "one update per `period_seconds` or `period_samples` of a live stream."
        ),
    )
    size: int = Field(
        default=8,
        ge=1,
        description="Samples per optimizer step (the effective batch); the starting point of "
        "adaptive policies.",
    )
    micro_batch: int = Field(
        default=8,
        ge=1,
        description="Samples per forward/backward; gradient accumulation covers the rest. "
        "The resource policy ignores it and starts at the whole batch.",
    )
    min_size: int = Field(
        default=1,
        json_schema_extra=for_strategies(*SIZE_CHOOSING_POLICIES),
        ge=1,
        description="Smallest effective batch the policy may choose.",
    )
    max_size: int = Field(
        default=64,
        json_schema_extra=for_strategies(*SIZE_CHOOSING_POLICIES),
        ge=1,
        description="Largest effective batch the policy may choose.",
    )

    # adaptive
    signal: Literal["loss_trend", "noise_scale"] = Field(
        default="loss_trend",
        json_schema_extra=for_strategies("adaptive"),
        description=(
            "adaptive: loss_trend grows the batch when the loss plateaus or its noise hides "
            "the trend and shrinks it when the loss rises (new data); noise_scale targets "
            "the gradient noise scale tr(Sigma)/|G|^2 estimated from grad norms at different "
            "batch sizes (falls back to loss_trend until two sizes have been seen)."
        ),
    )
    window: int = Field(
        default=8,
        json_schema_extra=for_strategies("adaptive"),
        ge=2,
        description="adaptive: steps observed at one batch size before the next decision.",
    )
    grow_factor: float = Field(
        default=2.0,
        json_schema_extra=for_strategies("adaptive"),
        gt=1.0,
        description="adaptive: the most the batch is multiplied (or divided) by per decision.",
    )
    plateau_tolerance: float = Field(
        default=0.01,
        json_schema_extra=for_strategies("adaptive"),
        ge=0.0,
        description="adaptive: relative loss improvement over a window below which the loss "
        "counts as plateaued (grow).",
    )
    rise_tolerance: float = Field(
        default=0.05,
        json_schema_extra=for_strategies("adaptive"),
        ge=0.0,
        description="adaptive: relative loss rise over a window above which the batch shrinks "
        "so the model adapts to a shift with more, smaller steps.",
    )

    # uncertainty
    entropy_low: float = Field(
        default=1.0,
        json_schema_extra=for_strategies("uncertainty"),
        description="uncertainty: pool mean entropy (nats) at or below which the batch is min_size.",
    )
    entropy_high: float = Field(
        default=5.0,
        json_schema_extra=for_strategies("uncertainty"),
        description="uncertainty: pool mean entropy (nats) at or above which the batch is max_size.",
    )

    # resource
    memory_headroom: float = Field(
        default=0.1,
        json_schema_extra=for_strategies("resource"),
        ge=0.0,
        lt=1.0,
        description="resource: fraction of device memory kept free when sizing the micro-batch.",
    )
    regrow_after: int = Field(
        default=50,
        json_schema_extra=for_strategies("resource"),
        ge=1,
        description="resource: steps after an OOM before the micro-batch may grow again.",
    )

    # periodic
    period_seconds: float | None = Field(
        default=None,
        json_schema_extra=for_strategies("periodic"),
        gt=0.0,
        description="periodic: aim for one optimizer step per this many seconds, sizing the "
        "batch from the measured sample throughput.",
    )
    period_samples: int | None = Field(
        default=None,
        json_schema_extra=for_strategies("periodic"),
        ge=1,
        description="periodic: one optimizer step per this many accumulated samples (with "
        "period_seconds too, whichever comes first).",
    )
    throughput_smoothing: float = Field(
        default=0.3,
        json_schema_extra=for_strategies("periodic"),
        gt=0.0,
        le=1.0,
        description="periodic: weight of the newest throughput measurement in its moving "
        "average (1.0 = trust only the last step).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BatchConfig:
        problems = []
        if self.min_size > self.max_size:
            problems.append(f"batch.min_size ({self.min_size}) > batch.max_size ({self.max_size})")
        # fixed and resource train `size` whatever the bounds (which they do not accept).
        if self.uses("min_size") and not self.min_size <= self.size <= self.max_size:
            problems.append(
                f"batch.size ({self.size}) must lie within "
                f"[min_size={self.min_size}, max_size={self.max_size}]"
            )
        if self.entropy_low >= self.entropy_high:
            problems.append("batch.entropy_low must be below batch.entropy_high")
        if (
            self.policy == "periodic"
            and self.period_seconds is None
            and self.period_samples is None
        ):
            problems.append(
                "batch.policy 'periodic' needs batch.period_seconds or batch.period_samples"
            )
        if self.period_samples is not None and not (
            self.min_size <= self.period_samples <= self.max_size
        ):
            problems.append(
                f"batch.period_samples ({self.period_samples}) must lie within "
                f"[min_size={self.min_size}, max_size={self.max_size}]"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self
