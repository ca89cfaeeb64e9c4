"""The recipe: one typed schema grouped like the YAML file.

Every section is a pydantic model with ``extra="forbid"``. :func:`load_recipe` reads YAML with
``yaml.safe_load`` semantics (except that a key given twice is an error), applies dotted
command-line overrides (``optim.lr=3e-4``), validates, and reports *all* problems at once, each
with its YAML path and a did-you-mean hint for typos.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from olm_cli.batching.config import BatchConfig
from olm_cli.config_base import IGNORE_INAPPLICABLE_KEYS, Section
from olm_cli.distill.config import DistillConfig
from olm_cli.errors import RecipeError
from olm_cli.meta.config import MetaConfig
from olm_cli.partial.config import TrainConfig
from olm_cli.regularize.config import RegularizeConfig
from olm_cli.replay.config import ReplayConfig
from olm_cli.selectors.config import SelectorConfig

ARCH_SIZES: dict[str, dict[str, int]] = {
    # ~1.9M parameters with a 4k vocabulary: trains at tens of thousands of tokens/s on a CPU.
    "tiny": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 352},
    # ~9M parameters with an 8k vocabulary: the "real" CPU size for benchmarks.
    "small": {"hidden_size": 256, "num_hidden_layers": 6, "num_attention_heads": 8, "intermediate_size": 704},
}


class ArchConfig(Section):
    """Architecture of a model trained from scratch (Llama-style)."""

    size: Literal["tiny", "small"] = Field("tiny", description="Preset size; explicit fields below override it.")
    vocab_size: int = Field(4096, gt=255, description="Vocabulary of the byte-level BPE tokenizer trained on the first shards.")
    hidden_size: int | None = Field(None, gt=0, description="Override the preset's hidden size.")
    num_hidden_layers: int | None = Field(None, gt=0, description="Override the preset's depth.")
    num_attention_heads: int | None = Field(None, gt=0, description="Override the preset's head count.")
    intermediate_size: int | None = Field(None, gt=0, description="Override the preset's MLP width.")
    max_position_embeddings: int = Field(2048, gt=0, description="Longest sequence the model accepts.")
    tokenizer_train_chars: int = Field(2_000_000, gt=0, description="Characters of the first shards used to train the tokenizer.")

    def resolved(self) -> dict[str, int]:
        sizes = dict(ARCH_SIZES[self.size])
        for key in sizes:
            value = getattr(self, key)
            if value is not None:
                sizes[key] = value
        return sizes


class ModelConfig(Section):
    """Where the starting model comes from."""

    init: Literal["pretrained", "scratch"] = Field(
        "pretrained", description="`pretrained`: load `name_or_path`; `scratch`: build `arch` and train a tokenizer."
    )
    name_or_path: str | None = Field(None, description="Hub id or local directory of an HF causal LM (or the folder of a GGUF file).")
    gguf_file: str | None = Field(None, description="GGUF file name inside `name_or_path`; the weights are de-quantised and saved back as safetensors.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    tokenizer: str | None = Field(None, description="Tokenizer source if it differs from the model's.")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code from the hub. Off unless you trust the repository.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Dtype the weights are held in (mixed precision is `run.mixed_precision`).")
    attn_implementation: Literal["sdpa", "flash_attention_2", "eager"] | None = Field(
        None,
        description="Attention kernel of the trained model, as transformers names it: `sdpa` (PyTorch's fused attention), `flash_attention_2` (needs the `flash-attn` package, CUDA and bf16/fp16 weights or mixed precision) or `eager`; unset: transformers' default for the model (sdpa where supported).",
    )
    arch: ArchConfig = Field(default_factory=ArchConfig, description="Architecture for `init: scratch`.")

    @model_validator(mode="after")
    def _source_is_named(self) -> ModelConfig:
        if self.init == "pretrained" and not self.name_or_path:
            raise ValueError("`model.name_or_path` is required when model.init is 'pretrained'")
        if self.gguf_file and not self.name_or_path:
            raise ValueError("`model.gguf_file` needs `model.name_or_path` (the folder holding it)")
        return self


class DataConfig(Section):
    """The growing set of training shards and how they become token blocks."""

    shards: list[str] = Field(default_factory=list, description="Shard files, directories or globs (jsonl, json, parquet, txt; optionally .gz). Re-globbed on every run.")
    dataset: str | None = Field(None, description="Instead of shards: a hub dataset id or a local dataset directory, streamed.")
    dataset_split: str = Field("train", description="Split of `dataset`.")
    format: Literal["auto", "jsonl", "parquet", "txt"] = Field("auto", description="Shard format; `auto` uses the file extension.")
    text_field: str = Field("text", description="Field holding the document text (jsonl/parquet).")
    domain_from: Literal["path", "field"] = Field("path", description="Domain label from the shard path (`domain_pattern`) or from a field of each record.")
    domain_pattern: str = Field(
        r"(?:\d+-)?(?P<domain>[^/\\]+)[/\\][^/\\]+$",
        description="Regex applied to the shard path; the `domain` group names the domain. Default: the parent folder, without a leading `NN-`.",
    )
    domain_field: str = Field("domain", description="Record field holding the domain when domain_from is `field`.")
    block_size: int = Field(256, gt=1, description="Tokens per packed training block (documents joined with EOS).")
    min_block_tokens: int = Field(8, gt=1, description="Shard tails shorter than this are dropped rather than trained as a short block.")
    max_document_tokens: int = Field(
        1_000_000,
        gt=0,
        description="Longest document trained as one: far above a book (100-300k tokens), so it only catches data accidents (a dump, a log or a whole corpus in one record) whose one-piece handling would hold millions of tokens in memory and in a checkpoint.",
    )
    long_documents: Literal["split", "skip"] = Field(
        "split",
        description="A document over `max_document_tokens`: `split` into pieces of at most that many tokens, each packed like a document, or `skip` it. Either way a warning names the shard and record, and the ledger entry counts them.",
    )
    allow_empty: bool = Field(False, description="Let a `shards` pattern match no file (then there is simply nothing to do). Off: such a pattern is a recipe error (exit 2), so a typo or an unmounted disk is not mistaken for a quiet night.")
    prefetch: int = Field(
        4,
        ge=0,
        description="Steps' worth of blocks a background thread reads, tokenises and packs ahead of the training step, so the step does not wait for tokenisation (0: read inline). The blocks, the ledger and every checkpoint are the same as inline.",
    )
    shuffle_buffer: int = Field(
        0,
        ge=0,
        description="Blocks held in a shuffle buffer; each block trained is drawn at random from it (seeded by run.seed and the increment, checkpointed), so a batch mixes documents, shards and domains of the increment. A shard is done once none of its blocks is left in the buffer; the buffer drains at the end of the data. 0: off, blocks in reading order.",
    )

    lanes: int | Literal["auto"] = Field(
        "auto",
        description="Lanes the increment's shards are split into (by bytes); with several processes each rank reads, tokenises and packs only its lanes (lane l on rank l % N) and the blocks are exchanged, so the data work is split while every step trains the blocks one process would. The blocks trained depend on the lane count, not on the number of processes. `auto`: one lane per process when the increment begins. A resumed increment, and data carried to the next one, keep their count. See docs/distributed.md.",
    )

    @field_validator("lanes", mode="before")
    @classmethod
    def _lanes_count_or_auto(cls, value: Any) -> int | str:
        if value == "auto":
            return "auto"
        try:
            count = int(value) if not isinstance(value, bool | float) else None
        except (TypeError, ValueError):
            count = None
        if count is None or count < 1:
            raise ValueError(f"must be an integer of at least 1, or `auto` (got {value!r})")
        return count

    @field_validator("domain_pattern")
    @classmethod
    def _pattern_has_domain_group(cls, value: str) -> str:
        try:
            compiled = re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from exc
        if "domain" not in compiled.groupindex:
            raise ValueError("the pattern needs a named group `(?P<domain>...)`")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if not self.shards and not self.dataset:
            raise ValueError("give `data.shards` (files/globs) or `data.dataset`")
        if self.shards and self.dataset:
            raise ValueError("give either `data.shards` or `data.dataset`, not both")
        return self


class OptimConfig(Section):
    """AdamW with warm-up and cosine re-decay restarted at every increment, or warm-up once and a constant rate (`wsd`)."""

    lr: float = Field(3e-4, gt=0, description="Peak learning rate of each increment.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine (and linear) decay, and `wsd`'s cooldown, end at lr * min_lr_ratio.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up: at the start of every increment, or once per run directory with `schedule: wsd`.")
    schedule: Literal["cosine", "constant", "linear", "wsd"] = Field(
        "cosine",
        description="Decay after warm-up. `cosine`/`linear`/`constant`: re-warmed and re-decayed inside every increment. "
        "`wsd` (warm-up, stable, decay): warm-up once per run directory, then a constant rate through every increment "
        "(the trunk, optimiser state carried); each increment's release is a cooldown branch off the trunk "
        "(`cooldown_fraction`, `cooldown_shape`) and the next increment continues from the trunk, not the cooled model.",
    )
    cooldown_fraction: float = Field(
        0.1, gt=0, le=1,
        description="`wsd` only: the cooldown branch trains this fraction of the increment's trunk steps (at least one), "
        "on the increment's data read again from its start, mixed with replay at `replay.ratio`.",
    )
    cooldown_shape: Literal["linear", "cosine", "sqrt"] = Field(
        "sqrt",
        description="`wsd` only: how the cooldown's rate falls from `lr` to `lr * min_lr_ratio` with progress p: "
        "`linear` 1-p, `cosine` (1+cos(pi p))/2, `sqrt` 1-sqrt(p) (arXiv 2405.18392).",
    )
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay (not applied to norms and biases).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm to this (0 disables).")
    reset_optimizer: bool = Field(False, description="Start every increment with fresh AdamW moments.")
    meta: MetaConfig = Field(default_factory=MetaConfig, description="Meta-learned outer update around the optimiser steps (Reptile).")


TrackerName = Literal["tensorboard", "mlflow", "wandb", "aim", "comet_ml", "clearml", "dvclive", "swanlab", "trackio"]


class RunConfig(Section):
    """The run directory and the shape of one increment."""

    dir: str = Field("runs/olm", description="Run directory: checkpoints, ledger, replay, metrics.")
    seed: int = Field(0, description="Seed for weights, data order, selectors and replay.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps per increment (also the schedule horizon). Unset with max_tokens unset: one pass over the planned shards, counted before training.")
    max_tokens: int | None = Field(None, gt=0, description="Training tokens per increment; converted to steps with the batch size.")
    max_shards_per_increment: int | None = Field(None, gt=0, description="Cap on shards one invocation consumes.")
    time_budget: float | None = Field(None, gt=0, description="Seconds from the start of the invocation; stop at the next step boundary after it (at least one step is trained), checkpoint, and continue next time.")
    retrain_changed: bool = Field(False, description="Re-train shards whose content changed after they were trained.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="Autocast precision (Accelerate).")
    checkpoint_every: int = Field(200, gt=0, description="Steps between checkpoints (one is always written at the end of an increment).")
    keep_checkpoints: int = Field(3, gt=0, description="Complete checkpoints kept on disk.")
    async_checkpoint: bool = Field(True, description="Write the periodic checkpoints in a background thread while training continues (their state is copied to host memory at the step boundary; needs that much free RAM). A failed write is reported at the next checkpoint or the end of the increment; the final, stop and time-budget checkpoints are always waited for. false: training waits for every write.")
    log_every: int = Field(1, gt=0, description="Steps between metrics lines.")
    trackers: list[TrackerName] = Field(
        default_factory=list,
        description="Experiment trackers the step, eval and continual-learning metrics go to, through Accelerate's tracker classes: `tensorboard` (RUN/tensorboard), `mlflow` (MLFLOW_TRACKING_URI; unset: RUN/mlflow.db), `wandb`, `aim` (RUN/.aim), `comet_ml`, `clearml`, `dvclive`, `swanlab`, `trackio`. Tags: `train/loss`, `train/lr`, `train/tokens_per_s`, `eval/<domain>/loss`, `cl/forgetting/<domain>`, ... (docs/operations.md). Each needs its package installed.",
    )
    tracker_project: str | None = Field(None, description="Project (W&B, Aim, Comet, ClearML) or experiment (MLflow) name the trackers log under; unset: the run directory's name.")
    tracker_options: dict[TrackerName, dict[str, Any]] = Field(
        default_factory=dict,
        description="Extra keyword arguments per tracker for its start, e.g. `{wandb: {entity: my-team, tags: [nightly]}}` (passed to `wandb.init`).",
    )
    tensorboard: bool = Field(False, description="Alias of `trackers: [tensorboard]` (kept for older recipes).")
    max_bad_steps: int = Field(5, gt=0, description="Consecutive NaN/Inf steps before rolling back to the last checkpoint and stopping.")
    progress: bool = Field(True, description="Show a live progress bar on a terminal.")
    compile: bool = Field(False, description="`torch.compile` the training forward. Compilation is paid once per invocation, at the first step (and again for a new batch shape, e.g. a shard's short last block); it pays off on long increments on a GPU.")
    loss_implementation: Literal["standard", "chunked"] = Field(
        "standard",
        description="`chunked`: the cross-entropy goes through the LM head `loss_chunk_tokens` tokens at a time and never holds the full [batch, tokens, vocabulary] logits (less peak memory with a large vocabulary, same loss and gradients); on CUDA with the `liger-kernel` package installed, Liger's fused linear cross-entropy is used. Parts that read the logits (distillation, `replay.store_logits_topk`) need `standard`.",
    )
    loss_chunk_tokens: int = Field(2048, gt=0, description="Tokens per chunk of the chunked loss: peak memory holds one chunk's logits (chunk x vocabulary floats).")
    distributed: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="How several processes (torchrun, accelerate launch) share the training. `ddp`: every rank holds the whole model and optimiser. `fsdp`: parameters, gradients and AdamW moments are sharded with FSDP2 (`fully_shard` per decoder layer), checkpoints keep the optimiser sharded (torch.distributed.checkpoint) and the weights gathered. `auto`: `fsdp` when the launcher asks for it (`accelerate launch --use_fsdp --fsdp_version 2`), else `ddp` with more than one process. See docs/distributed.md.",
    )

    @model_validator(mode="after")
    def _tensorboard_alias(self) -> RunConfig:
        """`tensorboard: true` (the key of older recipes) is `tensorboard` in `trackers`; a name given twice counts once."""
        if self.tensorboard and "tensorboard" not in self.trackers:
            self.trackers.insert(0, "tensorboard")
        self.trackers[:] = list(dict.fromkeys(self.trackers))  # in place: assigning would validate again
        unused = sorted(set(self.tracker_options) - set(self.trackers))
        if unused:
            raise ValueError(f"run.tracker_options names {', '.join(unused)}, which is not in run.trackers")
        return self



GATE_ANY_DOMAIN = "*"


class GateConfig(Section):
    """Loss budgets a release must meet, against the previous release, before `releases/latest` moves to it."""

    max_regression: dict[str, float] = Field(
        default_factory=dict,
        description="Eval domain (or `*`: every domain not named) -> largest allowed increase of its loss over "
        "the previous release, e.g. `{\"*\": 0.05, code: 0.02}`. Empty: no budgets (a release still needs finite "
        "weights and every eval domain measured). The first release has nothing to compare with and passes.",
    )
    relative: bool = Field(True, description="Budgets are fractions of the previous release's loss (0.05 = 5%); false: absolute nats.")

    @field_validator("max_regression")
    @classmethod
    def _budgets_are_non_negative(cls, budgets: dict[str, float]) -> dict[str, float]:
        # `not value >= 0` also refuses NaN; `.inf` (no budget for that domain) is allowed.
        bad = [f"{name}: {value}" for name, value in budgets.items() if not value >= 0]
        if bad:
            raise ValueError(f"budgets must be zero or more (an allowed loss increase), got {', '.join(bad)}")
        return budgets


class EvalConfig(Section):
    """Held-out sets, one per domain."""

    sets: dict[str, str] = Field(default_factory=dict, description="Domain name -> held-out file (same formats as shards).")
    max_tokens: int = Field(50_000, gt=0, description="Tokens evaluated per domain at most.")
    batch_size: int = Field(8, gt=0, description="Blocks per evaluation forward.")
    after_increment: bool = Field(True, description="Evaluate every domain after each increment and add a row to the continual-learning matrix.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Release gate: loss budgets against the previous release.")
    report: bool = Field(False, description="Regenerate `RUN/report/` (`olm report`'s HTML page and figures) after every increment; needs matplotlib (`pip install 'olm[report]'`). A report that cannot be drawn is a warning, never a failed increment.")

    @field_validator("report")
    @classmethod
    def _report_can_be_drawn(cls, value: bool, info: ValidationInfo) -> bool:
        """Say so at validation, not after a night's training; a run's own recipe.yaml is not
        refused on a machine without matplotlib (the engine then warns once per increment)."""
        written_by_olm = bool(info.context and info.context.get(IGNORE_INAPPLICABLE_KEYS))
        if value and not written_by_olm and importlib.util.find_spec("matplotlib") is None:
            raise ValueError("needs matplotlib, which is not installed: pip install 'olm[report]'")
        return value

    @model_validator(mode="after")
    def _gate_can_be_measured(self) -> EvalConfig:
        """A budget that can never be measured would reject every release (or none): say so now."""
        budgets = self.gate.max_regression
        if not budgets:
            return self
        if not self.sets:
            raise ValueError("eval.gate.max_regression needs eval.sets: without eval sets there is no loss to compare")
        if not self.after_increment:
            raise ValueError("eval.gate.max_regression needs eval.after_increment: true (the gate compares the eval run after each increment)")
        unknown = sorted(name for name in budgets if name != GATE_ANY_DOMAIN and name not in self.sets)
        if unknown:
            hints = [f"`{close[0]}`" for name in unknown if (close := difflib.get_close_matches(name, list(self.sets), n=1))]
            hint = f"; did you mean {', '.join(hints)}?" if hints else f"; eval.sets has {', '.join(sorted(self.sets))}"
            raise ValueError(
                f"eval.gate.max_regression names domain(s) {', '.join(unknown)} that are not in eval.sets"
                f"{hint} (`{GATE_ANY_DOMAIN}` means every domain)"
            )
        return self


class ReleaseConfig(Section):
    """What serving reads: `RUN/releases/`, written after every completed increment and gated (see `eval.gate`)."""

    enabled: bool = Field(True, description="Write a release (model, tokenizer, model card) after every completed increment; `RUN/releases/latest` moves to it only when it passes the gate.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Dtype of the released weights (`auto`: the training model's). Only the saved copy is cast.")
    keep: int = Field(3, gt=0, description="Newest releases kept on disk, released or rejected; the one `releases/latest` points to is never removed.")
    merge: Literal["none", "sma"] = Field(
        "none",
        description="`sma`: the release is the simple moving average of the last `merge_last` trunk checkpoints "
        "(no extra training; arXiv 2505.12082), best with a constant rate (`optim.schedule: wsd` or `constant`). "
        "With `wsd` the cooldown starts from that average. `none`: the trunk's (or the cooldown's) weights.",
    )
    merge_last: int = Field(
        3, ge=1,
        description="`merge: sma` only: how many of the newest trunk checkpoints (periodic ones included, "
        "`run.checkpoint_every`) are averaged; `run.keep_checkpoints` must keep at least this many.",
    )


class Recipe(BaseModel):
    """A whole olm recipe."""

    model_config = Section.model_config

    model: ModelConfig
    data: DataConfig
    selector: SelectorConfig = Field(default_factory=SelectorConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    regularize: RegularizeConfig = Field(default_factory=RegularizeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    run: RunConfig
    eval: EvalConfig = Field(default_factory=EvalConfig)
    release: ReleaseConfig = Field(default_factory=ReleaseConfig)

    @model_validator(mode="after")
    def _stream_has_horizon(self) -> Recipe:
        if self.data.dataset and self.run.max_steps is None and self.run.max_tokens is None:
            raise ValueError("a streamed dataset has no length: set `run.max_steps` or `run.max_tokens` (per increment)")
        return self

    @model_validator(mode="after")
    def _stored_logits_are_kept(self) -> Recipe:
        if self.distill.method == "stored_logits":
            if self.replay.policy == "none":
                raise ValueError("distill.method 'stored_logits' needs a replay buffer (replay.policy)")
            if self.replay.store_logits_topk == 0:
                self.replay.store_logits_topk = self.distill.topk
            elif self.replay.store_logits_topk != self.distill.topk:
                raise ValueError(
                    f"replay.store_logits_topk ({self.replay.store_logits_topk}) must equal distill.topk ({self.distill.topk})"
                )
        return self

    @model_validator(mode="after")
    def _chunked_loss_has_no_logit_readers(self) -> Recipe:
        if self.run.loss_implementation != "chunked":
            return self
        if self.distill.method != "none":
            raise ValueError(f"run.loss_implementation 'chunked' never builds the student's logits, which distill.method "
                             f"'{self.distill.method}' reads; use run.loss_implementation: standard")
        if self.replay.store_logits_topk:
            raise ValueError("run.loss_implementation 'chunked' never builds the logits that replay.store_logits_topk "
                             "keeps; use run.loss_implementation: standard")
        return self

    @model_validator(mode="after")
    def _release_branch_is_buildable(self) -> Recipe:
        if self.release.merge == "sma" and self.release.merge_last > self.run.keep_checkpoints:
            raise ValueError(f"release.merge_last ({self.release.merge_last}) averages more trunk checkpoints than "
                             f"run.keep_checkpoints ({self.run.keep_checkpoints}) keeps; raise run.keep_checkpoints "
                             f"to at least {self.release.merge_last}")
        if self.release.merge == "sma" and self.optim.schedule == "wsd" and self.train.lora is not None:
            raise ValueError("release.merge 'sma' with optim.schedule 'wsd' cools down from averaged merged weights, "
                             "which a LoRA model (train.lora) cannot train from; use one of the two")
        return self

    @model_validator(mode="after")
    def _flash_attention_has_half_precision(self) -> Recipe:
        half = self.model.dtype != "float32" or self.run.mixed_precision != "no"
        if self.model.attn_implementation == "flash_attention_2" and not half:
            raise ValueError("model.attn_implementation 'flash_attention_2' runs in bf16/fp16 only: set model.dtype "
                             "bfloat16 or run.mixed_precision bf16")
        return self

    @model_validator(mode="after")
    def _sharding_supports_the_recipe(self) -> Recipe:
        if self.run.distributed != "fsdp":
            return self
        if self.run.mixed_precision == "fp16":
            raise ValueError("run.distributed 'fsdp' runs in float32 or bf16 (run.mixed_precision fp16 needs a sharded "
                             "gradient scaler); use run.mixed_precision bf16")
        if self.train.lora is not None:
            raise ValueError("run.distributed 'fsdp' shards whole models; train.lora trains a few adapter weights, which "
                             "need no sharding: use run.distributed ddp")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- loading


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping names the same key twice; plain YAML would silently keep the last one."""

    def __init__(self, problem: str, mark: yaml.Mark) -> None:
        super().__init__(problem=problem, problem_mark=mark)
        self.line = mark.line + 1  # 1-based, as editors count


class RecipeLoader(yaml.SafeLoader):
    """``yaml.safe_load`` semantics, except that a key repeated in one mapping is an error.

    A recipe with two ``run:`` blocks (one pasted from another recipe, say) would otherwise
    train with whichever came last and never say so. Checked at every depth, and for keys
    that are equal after parsing (``1`` and ``0x1``), not just spelled alike.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        # Keys merged in with `<<: *anchor` may be overridden (that is what merging is for),
        # so only the mapping's own keys are compared; the anchor's are checked on their own.
        own_keys = [key_node for key_node, _ in node.value if key_node.tag != "tag:yaml.org,2002:merge"]
        first_seen: dict[Any, yaml.Node] = {}
        for key_node in own_keys:
            key = self.construct_object(key_node, deep=deep)
            try:
                earlier = first_seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base class reports it properly
                continue
            if earlier is not key_node:
                raise DuplicateKeyError(
                    f"duplicate key {key!r} (first at line {earlier.start_mark.line + 1})", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The parser's one-line reason: a marked error's ``problem``, else the message's first line."""
    problem = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else None
    return problem or (str(exc).splitlines() or [type(exc).__name__])[0]


# --------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=3e-4`` -> (["optim", "lr"], 0.0003). The value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
    path = [part for part in key.strip().split(".")]
    if any(not part for part in path):
        raise RecipeError(f"override key {key!r} has an empty part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({_yaml_problem(exc)})") from exc
    # YAML 1.1 reads "3e-4" as a string; a recipe value that looks numeric is meant as a number.
    if isinstance(value, str):
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d*\.?\d+(e[-+]?\d+)?", value, re.I) else value
        except ValueError:
            pass
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override {text!r}: `{part}` is not a section")
            node = child
        node[path[-1]] = value
    return data


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields of the section that ``loc`` points into (for did-you-mean)."""
    current: Any = model
    for part in loc[:-1]:
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


# Other tools' names for olm's keys, for the did-you-mean hint (Accelerate's `log_with`, HF Trainer's `report_to`).
KEY_SYNONYMS = {"log_with": "trackers", "report_to": "trackers"}


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s) in the recipe:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(Recipe, loc)
            close = difflib.get_close_matches(str(loc[-1]), known, n=1) or [
                KEY_SYNONYMS[key] for key in [str(loc[-1])] if KEY_SYNONYMS.get(key) in known]
            hint = f"; did you mean `{close[0]}`?" if close else (f"; known keys: {', '.join(known)}" if known else "")
            lines.append(f"  {path}: unknown key{hint}")
        else:
            message = err["msg"].removeprefix("Value error, ")
            lines.append(f"  {path}: {message}")
    return "\n".join(lines)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe", *, written_by_olm: bool = False) -> Recipe:
    """Validate ``data``; ``written_by_olm``: a run directory's resolved recipe, whose older versions
    list every strategy's keys, so keys of unselected strategies are dropped rather than refused."""
    try:
        return Recipe.model_validate(data, context={IGNORE_INAPPLICABLE_KEYS: written_by_olm})
    except ValidationError as exc:
        raise RecipeError(format_validation_error(exc, source)) from None


def load_recipe(path: Path | str, overrides: list[str] | None = None, *, written_by_olm: bool = False) -> Recipe:
    """Read, override and validate a recipe; every failure is a :class:`RecipeError` (exit 2).

    ``written_by_olm``: ``path`` is a run directory's ``recipe.yaml`` (see :func:`recipe_from_dict`).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except UnicodeDecodeError as exc:
        raise RecipeError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror})") from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as exc:
        raise RecipeError(f"{path}:{exc.line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: malformed YAML: {_yaml_problem(exc)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: the recipe must be a mapping of sections, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    recipe = recipe_from_dict(data, str(path), written_by_olm=written_by_olm)
    return _resolve_paths(recipe, path.parent)


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Relative paths in a recipe are relative to the recipe file, like every config-driven tool."""

    def resolve(value: str) -> str:
        p = Path(value).expanduser()
        return os.path.normpath(p if p.is_absolute() else (base / p))

    recipe.data.shards = [resolve(s) for s in recipe.data.shards]
    if recipe.data.dataset and Path(base / recipe.data.dataset).exists():
        recipe.data.dataset = resolve(recipe.data.dataset)
    recipe.eval.sets = {name: resolve(p) for name, p in recipe.eval.sets.items()}
    if recipe.replay.seed_from != "generate":
        recipe.replay.seed_from = [resolve(s) for s in recipe.replay.seed_from]
    recipe.run.dir = resolve(recipe.run.dir)
    model = recipe.model
    if model.name_or_path and (base / model.name_or_path).exists():
        model.name_or_path = resolve(model.name_or_path)
    if model.tokenizer and (base / model.tokenizer).exists():
        model.tokenizer = resolve(model.tokenizer)
    if recipe.distill.teacher and (base / recipe.distill.teacher).exists():
        recipe.distill.teacher = resolve(recipe.distill.teacher)
    return recipe
