"""Recipe section ``selector``: which incoming samples become the next training batch."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from olm_cli.config_base import StrategySection, for_strategies
from olm_cli.selectors.registry import SELECTORS
from olm_cli.strategy import Registry

SelectionMode = Literal["topk", "sample", "threshold"]

SCORING_SELECTORS: tuple[str, ...] = ("entropy", "loss", "gradnorm", "diversity", "coverage")
"""Built-in selectors that score the pool with a forward pass; ``random`` neither scores nor
ranks. A selector registered from outside olm takes none of their keys."""


class SelectorConfig(StrategySection):
    """How a pool of candidates is scored and cut down to one batch.

    The pool is ``pool_factor`` times larger than the batch, so a factor of 1 means "train on
    everything that arrives" whatever the selector; the extra candidates are counted as
    unselected by the engine, never dropped silently.
    """

    strategy_registry: ClassVar[Registry[Any]] = SELECTORS
    strategy_key: ClassVar[str] = "name"
    strategy_kind: ClassVar[tuple[str, str]] = ("selector", "selectors")

    name: Annotated[str, AfterValidator(SELECTORS.check)] = Field(
        default="random",
        description=(
            "Scoring rule. random: uniform, no forward pass. entropy: mean predictive token "
            "entropy (model uncertainty). loss: mean next-token cross-entropy. gradnorm: "
            "closed-form per-sample bound on the LM-head gradient norm. diversity: k-center "
            "greedy on mean-pooled last hidden states (cosine distance). coverage: online "
            "k-means over embeddings, batch covers clusters in proportion to their mass."
        ),
    )
    pool_factor: int = Field(
        default=1,
        ge=1,
        description=(
            "Candidates drawn per step = pool_factor x samples needed. 1 disables selection "
            "in effect (everything is kept); 4 scores four candidates per training slot."
        ),
    )
    mode: SelectionMode = Field(
        default="topk",
        json_schema_extra=for_strategies(*SCORING_SELECTORS),
        description=(
            "topk: the k highest scores. sample: k draws without replacement with probability "
            "proportional to exp(score / temperature), which keeps some easy samples in the "
            "mix. threshold: candidates scoring at least `threshold`, best first, at most k "
            "(may return fewer, even none)."
        ),
    )
    temperature: float = Field(
        default=1.0,
        json_schema_extra=for_strategies(*SCORING_SELECTORS),
        gt=0.0,
        description=(
            "Softness of `sample` mode: large values approach uniform sampling, small values "
            "approach topk. Ignored by the other modes."
        ),
    )
    threshold: float | None = Field(
        default=None,
        json_schema_extra=for_strategies(*SCORING_SELECTORS),
        description=(
            "Minimum score kept in `threshold` mode (required there, in the selector's own "
            "units: nats for entropy/loss, cosine distance for diversity, importance for "
            "coverage)."
        ),
    )
    weighting: bool = Field(
        default=False,
        json_schema_extra=for_strategies(*SCORING_SELECTORS),
        description=(
            "Weight each selected sample's loss proportionally to its score, normalised to "
            "mean 1 over the batch, so the loss scale and learning rate keep their meaning."
        ),
    )
    num_clusters: int = Field(
        default=8,
        json_schema_extra=for_strategies("coverage"),
        ge=1,
        description="coverage: number of online k-means centroids kept across steps.",
    )
    cluster_decay: float = Field(
        default=0.99,
        json_schema_extra=for_strategies("coverage"),
        gt=0.0,
        le=1.0,
        description=(
            "coverage: per-step decay of each cluster's mass, so the notion of 'the stream's "
            "distribution' follows drift (1.0 = never forget)."
        ),
    )
    score_micro_batch: int = Field(
        default=16,
        json_schema_extra=for_strategies(*SCORING_SELECTORS),
        ge=1,
        description=(
            "Candidates per scoring forward pass. Scoring keeps no activations for backward, "
            "so this can usually exceed the training micro-batch."
        ),
    )
    score_tokens: int | None = Field(
        default=None,
        json_schema_extra=for_strategies(*SCORING_SELECTORS),
        ge=2,
        description=(
            "Score each candidate on its first score_tokens tokens only (null: the whole "
            "block). The scoring pass costs about score_tokens / block_size of a full one; "
            "the scores are estimates from the prefix."
        ),
    )

    @model_validator(mode="after")
    def _threshold_needs_value(self) -> SelectorConfig:
        if self.mode == "threshold" and self.threshold is None:
            raise ValueError("selector.mode 'threshold' requires selector.threshold to be set")
        return self
