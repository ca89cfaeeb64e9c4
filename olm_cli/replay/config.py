"""The ``replay`` section of a recipe.

Every field carries a ``description`` because the recipe reference in ``docs/`` is generated
from these models; a field without one would be an undocumented knob.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, Field, model_validator

from olm_cli.config_base import Section, StrategySection, for_strategies
from olm_cli.replay.registry import REPLAY_BUFFERS
from olm_cli.strategy import Registry

BUFFERED_POLICIES: tuple[str, ...] = (
    "reservoir",
    "fifo",
    "lru",
    "priority",
    "domain_balanced",
    "importance",
)
"""Built-in policies that keep a buffer; with ``none`` there is nothing to size, seed or replay.
A policy registered from outside olm takes none of their keys."""


class GenerateConfig(Section):
    """``replay.seed_from: generate``: the starting model's own samples warm-start the buffer."""

    samples: int = Field(256, gt=0, description="Samples to generate (each one replay item).")
    max_new_tokens: int = Field(128, gt=0, description="Tokens generated per sample, after its prompt (fewer when the model ends the text).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1: the model's own distribution).")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling: draw from the smallest set of tokens holding this probability.")
    prompts: list[str] = Field(
        default_factory=list,
        description="Texts the samples start from, used in turn (one per generation batch). Empty: each sample "
        "starts from the beginning-of-text token alone (the model's unconditional distribution).",
    )
    batch_size: int = Field(16, gt=0, description="Samples generated per forward batch.")


class ReplayConfig(StrategySection):
    """How much old data is kept, which of it, and how much of each batch it supplies."""

    strategy_registry: ClassVar[Registry[Any]] = REPLAY_BUFFERS
    strategy_key: ClassVar[str] = "policy"
    strategy_kind: ClassVar[tuple[str, str]] = ("replay policy", "replay policies")

    policy: Annotated[str, AfterValidator(REPLAY_BUFFERS.check)] = Field(
        "none",
        description=(
            "Which samples the buffer keeps and draws. 'none' disables replay. "
            "'reservoir': a uniform sample of everything seen. 'fifo': the most recent samples. "
            "'lru': evicts the sample replayed least recently (never-replayed samples first, "
            "oldest first). 'priority': keeps and draws samples with high score (e.g. loss), "
            "decayed by priority_ageing. 'domain_balanced': an equal share of the capacity per "
            "domain, drawn domain-uniformly. 'importance': a uniform reservoir drawn in "
            "proportion to score, with importance weights that keep the replay loss unbiased."
        ),
    )
    capacity: int = Field(
        10_000,
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        gt=0,
        description="Size limit of the buffer, counted in capacity_unit.",
    )
    capacity_unit: Literal["samples", "tokens"] = Field(
        "samples",
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        description=(
            "Unit of capacity: number of samples, or number of tokens summed over samples "
            "(stored logits do not count)."
        ),
    )
    ratio: float = Field(
        0.0,
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        ge=0.0,
        lt=1.0,
        description=(
            "Fraction of each training batch drawn from the buffer: the engine replays "
            "ratio * batch_size samples per step on average (stochastic rounding, so small ratios still replay). Must be below 1 so that every step "
            "still sees new data."
        ),
    )
    mode: Literal["add", "displace"] = Field(
        "add",
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        description=(
            "How replay shares an increment without a budget (no run.max_steps/max_tokens). 'add': the "
            "increment trains all its new data and replay comes on top (1 / (1 - ratio) times the steps "
            "of training on the new data alone). 'displace': the increment keeps that step budget; "
            "replayed samples take new ones' places and the new data left over is carried to the next "
            "increment, never lost. With a budget replay always displaces."
        ),
    )
    seed_from: list[str] | Literal["generate"] = Field(
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        default_factory=list,
        description=(
            "Shard paths or glob patterns (relative to the recipe's directory) whose blocks "
            "warm-start an empty buffer before the first step; or `generate`: the starting model's "
            "own samples (replay.generate), for a pretrained model whose training data you do not have."
        ),
    )
    generate: GenerateConfig = Field(
        default_factory=GenerateConfig,
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        description="How `seed_from: generate` samples: batched, resumable, its cost reported and recorded in RUN/replay-seed/.",
    )
    seed_samples: int = Field(
        1000,
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        ge=0,
        description="At most this many blocks are taken from seed_from (the first ones read).",
    )
    priority_ageing: float = Field(
        0.001,
        json_schema_extra=for_strategies("priority"),
        ge=0.0,
        description=(
            "priority policy only: exponential decay rate per training step of a sample's "
            "score, effective = score * exp(-priority_ageing * (step - scored_at_step)), "
            "where scored_at_step is the step of insertion or of the last update_scores. "
            "0 disables ageing; 0.001 halves a score in about 693 steps."
        ),
    )
    importance_smoothing: float = Field(
        0.1,
        json_schema_extra=for_strategies("importance"),
        ge=0.0,
        le=1.0,
        description=(
            "importance policy only: draw probability is (1 - s) * score / sum(scores) + s / N. "
            "The uniform share s bounds every importance weight by 1 / s, so one tiny score "
            "cannot blow up the loss. 1 gives plain uniform draws."
        ),
    )
    @model_validator(mode="after")
    def _generate_is_used(self) -> ReplayConfig:
        if self.generate != GenerateConfig() and self.seed_from != "generate":
            raise ValueError("replay.generate applies with replay.seed_from: generate")
        return self

    store_logits_topk: int = Field(
        0,
        json_schema_extra=for_strategies(*BUFFERED_POLICIES),
        ge=0,
        description=(
            "When > 0, the engine stores the model's top-k logits (float16 values, int32 "
            "indices, per position) with each inserted sample, for DER-style distillation on "
            "replayed samples. Costs 6 * k bytes per token on disk."
        ),
    )
