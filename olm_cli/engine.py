"""The training engine: one increment of continual training, readable top to bottom.

``Trainer.setup()`` loads everything in dependency order (accelerator → model and tokenizer →
strategy parts → optimiser → data → checkpointed state → the increment's start or resume).
``Trainer.train()`` runs the step::

    select → batch → mix replay → forward → losses (task + distillation + regulariser)
           → backward → step → log → checkpoint

Strategies plug into that line through one contract (:mod:`olm_cli.strategy`): each part is
built from its recipe section and a :class:`~olm_cli.strategy.StrategyContext` by its family's
registry, owns its state (``state_dict``/``load_state_dict``), and an absent part is a no-op
object, so this file names no strategy and never asks whether a part exists. Everything needed
to continue lives in the checkpoint, so a run killed at any moment resumes bit-identically.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from olm_cli.batching import StepStats
from olm_cli.checkpoint_snapshot import TrainingSnapshot, host_copy
from olm_cli.data import (
    BlockStream,
    discover_shards,
    is_dataset_source,
    lane_positions,
    rebase_position,
)
from olm_cli.distill import collate_stored
from olm_cli.distill.base import IncrementStart
from olm_cli.distill.kd import capture_topk
from olm_cli.distributed.agreement import agree_to_stop
from olm_cli.distributed.sharding import gradient_sync, is_sharded, nonfinite_parameters, replicated
from olm_cli.errors import EXIT_NOT_RELEASED, EXIT_OK, OlmError, TrainingDivergedError
from olm_cli.host_sync import AccumulatedBatch, fetch_step, to_device
from olm_cli.pipeline import PrefetchStream, ShuffleStream, json_position
from olm_cli.recipe import Recipe
from olm_cli.regularize.anchor import legacy_state
from olm_cli.rng import capture_rng, restore_rng, seed_everything
from olm_cli.run_state import IncrementPlan, TrainerState, TrainOutcome
from olm_cli.rundir import GracefulStop, ShardStatus
from olm_cli.rundir.async_writer import CheckpointWriter
from olm_cli.rundir.atomic import write_json_atomic, write_text_atomic
from olm_cli.rundir.checkpoint import checkpoint_name, loading_checkpoint, step_of
from olm_cli.rundir.optimizer_state import load_optimizer_state, optimizer_file_label
from olm_cli.samples import Block, collate, per_sample_loss
from olm_cli.schedule import wsd_multiplier
from olm_cli.selectors.contract import Selection
from olm_cli.state_files import load_tree
from olm_cli.strategy import StrategyContext
from olm_cli.trackers import Trackers

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- schedule and objective


def lr_multiplier(step: int, *, warmup: int, horizon: int, schedule: str, min_ratio: float) -> float:
    """Re-warm then re-decay inside one increment (continual pre-training practice)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, horizon - warmup))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": recipe.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) does the whole update in one pass per group.
    fused = all(p.is_floating_point() for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=recipe.optim.betas, eps=recipe.optim.eps, fused=fused)


def training_loss(ce: torch.Tensor, kd: torch.Tensor | None, penalty: torch.Tensor | None, *, alpha: float,
                  share: float) -> torch.Tensor:
    """The objective of one micro-batch: task cross-entropy, distillation and a weight-space penalty.

    ``alpha * ce + (1 - alpha) * kd`` when there is a distillation term, plus the penalty. ``ce``
    is already this micro-batch's part of the batch mean; ``kd`` and ``penalty`` are whole-batch
    quantities, so they are scaled by ``share`` (the micro-batch's fraction of this rank's
    samples) and gradient accumulation sums every term exactly once.
    """
    loss = ce if kd is None else alpha * ce + (1 - alpha) * kd * share
    return loss if penalty is None else loss + penalty * share


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """One invocation of ``olm train``: at most one increment (or the rest of an interrupted one)."""

    def __init__(self, recipe: Recipe, plan: IncrementPlan, *, console: Any = None,
                 stop: GracefulStop | None = None) -> None:
        self.recipe = recipe
        self.console = console
        # Installed by run_increment before setup, so a SIGTERM during a long set-up phase (GGUF
        # conversion, counting the blocks, the row-0 eval) is honoured too.
        self.stop = stop
        self.run_dir = Path(recipe.run.dir)
        self.started = plan.started
        # What to train was decided without torch (olm_cli.increment); adopt it.
        self.plan = plan
        self.checkpoints = plan.checkpoints
        self.latest = plan.latest
        self.ledger = plan.ledger
        self.resuming = plan.resuming
        self.shard_plan = plan.shards
        self.state = TrainerState.from_dict(plan.state)
        self.bad_steps = 0  # consecutive skipped batches
        self.saved_here: set[Path] = set()  # checkpoints written by this invocation
        # Periodic checkpoints are written in the background with run.async_checkpoint (one at a time).
        self.checkpoint_writer: CheckpointWriter[Path] = CheckpointWriter(background=recipe.run.async_checkpoint)
        self.micro_batch_used = recipe.batch.micro_batch
        self.restored_stream: dict[str, Any] | None = None  # the data position in the latest checkpoint's parts
        self.trackers = Trackers.none()  # started by setup()

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Everything the step needs, in dependency order (each step needs the ones before it)."""
        from olm_cli.modeling import check_attn_implementation

        transformers.utils.logging.disable_progress_bar()
        check_attn_implementation(self.recipe.model.attn_implementation)  # a RecipeError before anything is built
        self._setup_accelerator()
        if not self.resuming:
            # Numbered by the ledger, which a resume rewinds: a crashed increment reuses its number.
            self.state = TrainerState(increment=self.ledger.start_increment(), increment_complete=False,
                                      global_step=self.state.global_step, total_tokens=self.state.total_tokens,
                                      unselected=self.state.unselected)
        model = self._setup_model()  # model before optimiser; tokenizer before data
        self._setup_parts()  # strategies, built from (config, context); the partial-update plan wraps the model
        model = self.partial.prepare(model, self.state.increment)
        self.model, self.optimizer = self._prepare(model)
        self._setup_speed_options()  # after prepare: compile the module that will really run
        self.stream = self._make_training_stream()
        self.stream.warn = lambda message: self._say(f"[yellow]warning:[/] {message}")
        if self.latest is not None:
            self._restore_parts(self.latest)
        self._truncate_metrics(self.state.global_step)  # metric lines after our checkpoint belong to lost work
        # run.trackers (olm_cli/trackers.py), once the checkpoint has loaded: a fallback starts no second run.
        self.trackers = Trackers.open(self.recipe, main_process=self.accelerator.is_main_process, say=self._say)
        if self.resuming:
            self._resume_increment()
        else:
            self._begin_increment()
        self._set_lr()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator

        from olm_cli.distributed import resolve_mode

        # DDP or FSDP2 (docs/distributed.md); a launch asking for what olm cannot do stops here, in one line.
        self.distributed = resolve_mode(self.recipe.run.distributed)
        if self.distributed.sharded:
            os.environ["ACCELERATE_USE_FSDP"] = "false"  # olm shards the model itself (_prepare), not Accelerate
        self.accelerator = Accelerator(
            mixed_precision=self.recipe.run.mixed_precision,
            cpu=not torch.cuda.is_available(),
            project_dir=str(self.run_dir),
        )

    def _prepare(self, model: torch.nn.Module) -> tuple[Any, Any]:
        """The model and AdamW as training uses them: DDP through Accelerate, or sharded with FSDP2 first."""
        if not self.distributed.sharded:
            return self.accelerator.prepare(model, build_optimizer(model, self.recipe))
        from olm_cli.distributed.sharding import shard_model

        model = shard_model(model, device=self.accelerator.device, mixed_precision=self.recipe.run.mixed_precision,
                            reshard_after_forward=self.distributed.reshard_after_forward)
        return model, self.accelerator.prepare(build_optimizer(model, self.recipe))

    def _unsharded(self, *, on_every_rank: bool = False) -> torch.nn.Module | None:
        """The model for what runs outside the loop's lockstep (evaluation, LwF's start model).

        Unsharded: the model itself. Under FSDP a collective that gathers a plain copy, on rank 0
        only unless ``on_every_rank`` (one full model's memory wherever it is built).
        """
        if not self.distributed.sharded:
            return self.accelerator.unwrap_model(self.model)
        from olm_cli.distributed.sharding import unsharded_copy

        return unsharded_copy(self.model, device=self.accelerator.device, on_every_rank=on_every_rank)

    def _setup_model(self) -> torch.nn.Module:
        """The model and tokenizer: the latest checkpoint's, or the recipe's source for a new run."""
        from olm_cli.modeling import load_pretrained, load_source, load_tokenizer

        recipe = self.recipe
        if self.latest is not None:
            # Any failure here is CheckpointLoadError: run_increment falls back to an older checkpoint.
            with loading_checkpoint(self.latest, "the model or tokenizer"):
                model = load_pretrained(str(self.latest), dtype=recipe.model.dtype,
                                        attn_implementation=recipe.model.attn_implementation)
                tokenizer = load_tokenizer(str(self.latest))
        else:
            model, tokenizer = load_source(recipe.model, shards=self.shard_plan, text_field=recipe.data.text_field,
                                           seed=recipe.run.seed, cache_dir=self.run_dir / "base-model", say=self._say)
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)
        return model

    def _setup_parts(self) -> None:
        """Every strategy part of the recipe, through its family's registry."""
        from olm_cli.batching import BATCH_POLICIES
        from olm_cli.distill import DISTILLERS
        from olm_cli.meta import META_UPDATES
        from olm_cli.partial import PartialUpdates
        from olm_cli.regularize import REGULARIZERS
        from olm_cli.replay import REPLAY_BUFFERS
        from olm_cli.selectors import SELECTORS

        recipe, accelerator = self.recipe, self.accelerator
        context = StrategyContext(
            seed=recipe.run.seed, run_dir=self.run_dir, rank=accelerator.process_index,
            world_size=accelerator.num_processes, is_main=accelerator.is_main_process, recipe=recipe,
            load_model=self._load_model, say=self._say,
        )
        self.selector = SELECTORS.build(recipe.selector, context)
        self.policy = BATCH_POLICIES.build(recipe.batch, context)
        self.replay = REPLAY_BUFFERS.build(recipe.replay, context)
        self.distiller = DISTILLERS.build(recipe.distill, context)
        self.regularizer = REGULARIZERS.build(recipe.regularize, context)
        self.meta = META_UPDATES.build(recipe.optim.meta, context)
        self.partial = PartialUpdates(recipe.train, context)

    def _setup_speed_options(self) -> None:
        """How the training forward runs: ``run.compile`` and ``run.loss_implementation``.

        Only the training forward is compiled (``forward_model``): ``self.model`` stays the
        module Accelerate prepared, so saving, unwrapping, the selector's scoring and the
        evaluation see plain parameters and never trigger a compilation of their own.
        """
        from olm_cli.losses import ChunkedLMLoss
        from olm_cli.modeling import use_causal_attention_only

        run = self.recipe.run
        use_causal_attention_only(self.accelerator.unwrap_model(self.model))  # no mask read on the host per forward
        self.forward_model: Any = self.model
        if run.compile:
            self._say("run.compile: the training forward is compiled at the first step (paid once per invocation)")
            self.forward_model = torch.compile(self.model)
        self.chunked_loss: ChunkedLMLoss | None = None
        if run.loss_implementation == "chunked":
            self.chunked_loss = ChunkedLMLoss(self.accelerator.unwrap_model(self.model),
                                              chunk_tokens=run.loss_chunk_tokens, device=self.accelerator.device)

    def _load_model(self, source: str, *, trust_remote_code: bool = False) -> torch.nn.Module:
        """A frozen-to-be model (a teacher, LwF's start model) on the training device, in the recipe's dtype."""
        from olm_cli.modeling import load_pretrained

        model = load_pretrained(source, dtype=self.recipe.model.dtype, trust_remote_code=trust_remote_code)
        return model.to(self.accelerator.device)

    def _begin_increment(self) -> None:
        """A new increment: its data position, schedule, seeds, and every part's start."""
        recipe, state = self.recipe, self.state
        if self.plan.carried_state is not None:
            self.stream.load_state_dict(rebase_position(self.restored_stream or self.plan.carried_state, self.shard_plan))
        if self.latest is None or recipe.optim.reset_optimizer:
            self.optimizer.state.clear()
        self._say(f"increment {state.increment}: {len(self.shard_plan)} shard(s), "
                  + (f"starting from {self.latest.name}" if self.latest is not None else "starting from the base model"))
        state.horizon = self._horizon()
        seed_everything(recipe.run.seed + state.increment)
        # A carried plan starts at the shard its saved unit began in, so it can name shards already
        # finished (their last token trained last time): reopened, one would stay in progress for
        # good and be planned again once it left the plan.
        still_to_train = (ShardStatus.PENDING, ShardStatus.IN_PROGRESS)
        for path in self.shard_plan:
            if not is_dataset_source(path) and self.ledger.get(path).status in still_to_train:
                self.ledger.mark_in_progress(str(path), state.increment)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.distiller.begin_increment(self._distiller_model(), self._increment_start())
        self.regularizer.begin_increment(unwrapped)
        self.meta.begin_increment(unwrapped)
        if recipe.replay.seed_from and self.latest is None:
            self._seed_replay()
        evaluated = self._unsharded() if self.latest is None and recipe.eval.sets and recipe.eval.after_increment else None
        if evaluated is not None and self.accelerator.is_main_process:
            # Row 0 of the continual-learning matrix: the model before any increment.
            from olm_cli.evaluation.domains import record_increment_eval

            self._say(f"evaluating the starting model on {len(recipe.eval.sets)} domain(s) (row 0 of the matrix)")
            record_increment_eval(self.run_dir, recipe, evaluated, self.tokenizer, increment=0, trained={},
                                  step=state.global_step, console=self.console, trackers=self.trackers)

    def _resume_increment(self) -> None:
        """The rest of an interrupted increment: data position and generators as checkpointed."""
        assert self.latest is not None
        assert self.state.stream is not None, "a mid-increment checkpoint always holds the data position"
        self.stream.load_state_dict(self.restored_stream or self.state.stream)
        with loading_checkpoint(self.latest, "the RNG state"):
            restore_rng(load_tree(self.latest / "rng"))
        self._say(f"resuming increment {self.state.increment} at step {self.state.step} from {self.latest.name}")
        # LwF distils from the model the increment began from (it keeps that model itself).
        self.distiller.begin_increment(self._distiller_model(), self._increment_start())

    def _distiller_model(self) -> torch.nn.Module:
        """What a distiller starts from: under FSDP an unsharded copy on every rank, and only when
        a distiller is configured (LwF copies it as its teacher: one full model per rank)."""
        if self.distributed.sharded and self.recipe.distill.method == "none":
            return self.model
        model = self._unsharded(on_every_rank=True)
        assert model is not None
        return model

    def _increment_start(self) -> IncrementStart:
        return IncrementStart(increment=self.state.increment, resuming=self.resuming,
                              from_random_init=self.recipe.model.init == "scratch" and self.state.increment == 1)

    def _make_training_stream(self) -> ShuffleStream:
        """The stream the loop takes from: the plan's lanes (``data.lanes``; each rank reads its own
        and the blocks are exchanged), each read ahead by a worker thread (``data.prefetch`` steps),
        through the shuffle buffer (``data.shuffle_buffer``); see olm_cli/data/lanes.py and
        olm_cli/pipeline.py. Every call on it that reads or saves is a collective: all ranks make it.

        It quarantines the rest of a shard at a bad record (the ledger is told). The counting,
        consolidation and replay-seed streams stay plain :meth:`_make_stream` ones.
        """
        from olm_cli.data.lanes import LaneStream, lane_exchange

        data = self.recipe.data
        exchange = lane_exchange()  # made once: under several processes, a gloo group of its own
        # Ranks read disjoint lanes of the plan (data.lanes; olm_cli/data/lanes.py), each lane read ahead.
        self.lanes = LaneStream(self.shard_plan, self._make_lane, exchange=exchange,
                                lanes=exchange.world if data.lanes == "auto" else data.lanes)
        return ShuffleStream(self.lanes, size=data.shuffle_buffer, seed=[self.recipe.run.seed, self.state.increment])

    def _make_lane(self, shards: list[Path], lanes: int) -> PrefetchStream:
        """One lane of the training stream, read ahead by its own worker (a step's share of blocks a chunk)."""
        return PrefetchStream(self._make_stream(shards, bad_records="quarantine"),
                              replica=functools.partial(self._make_stream, shards, bad_records="quarantine"),
                              chunk_blocks=max(1, math.ceil(self._new_blocks_per_step() / lanes)),
                              depth=self.recipe.data.prefetch)

    def _make_stream(self, shards: list[Path] | None = None, *, bad_records: str = "raise") -> BlockStream:
        """A block stream over ``shards`` (default: this increment's plan) with the recipe's data settings."""
        data = self.recipe.data
        return BlockStream(
            self.shard_plan if shards is None else shards,
            self.tokenizer,
            block_size=data.block_size,
            fmt=data.format,
            text_field=data.text_field,
            domain_from=data.domain_from,
            domain_pattern=data.domain_pattern,
            domain_field=data.domain_field,
            min_block_tokens=data.min_block_tokens,
            max_document_tokens=data.max_document_tokens,
            long_documents=data.long_documents,
            warn=None,  # only the training stream reports long documents and bad records (see setup)
            bad_records=bad_records,
        )

    def _horizon(self) -> int:
        """Schedule length of this increment: the recipe's budget, or one pass over the plan.

        No second tokenisation pass: the stream reads its first unit and estimates the blocks
        to come from the shards' bytes and the tokens per byte it has seen (exact once it has
        read everything; :meth:`_correct_horizon` re-estimates after every step). A budget
        longer than the data is reported, and the cosine is planned on the steps that will
        really run instead of ending early at a high rate. A ``datasets`` source has no size:
        with a budget its horizon is the budget, without one its blocks are counted.
        """
        run = self.recipe.run
        budget: int | None = None
        if run.max_steps is not None:
            budget = run.max_steps
        elif run.max_tokens is not None:
            budget = max(1, math.ceil(run.max_tokens / (self.recipe.batch.size * self.recipe.data.block_size)))
        blocks = self.stream.remaining_blocks_estimate()
        if blocks is None:  # a streamed dataset
            if budget is not None:
                return budget  # an endless stream: reading it twice to count would cost a second download
            blocks = self._count_blocks()
        in_data = max(1, math.ceil(blocks / self._planned_blocks_per_step()))
        if budget is None or in_data >= budget:
            return budget or in_data
        key = "run.max_steps" if run.max_steps is not None else "run.max_tokens"
        value = run.max_steps if run.max_steps is not None else run.max_tokens
        self._say(f"[yellow]warning:[/] {key}={value} is more than this increment's data holds "
                  f"({round(blocks):,} blocks, about {in_data:,} steps); the schedule is planned on {in_data:,} steps")
        return in_data

    def _new_blocks_per_step(self) -> float:
        return self.recipe.batch.size * (1.0 - self.recipe.replay.ratio) * self.selector.pool_factor

    def _planned_blocks_per_step(self) -> float:
        """New blocks one step of an unbudgeted increment accounts for.

        ``replay.mode: add``: the new share of a batch, so the increment trains all its data and
        replay comes on top. ``displace``: a whole batch, so the increment takes as many steps as
        its new data alone would; replayed samples take new ones' places and the new data left
        over is carried to the next increment (as after a ``run.max_steps`` budget).
        """
        if self.recipe.replay.mode == "displace":
            return self.recipe.batch.size * self.selector.pool_factor
        return self._new_blocks_per_step()

    def _count_blocks(self) -> float:
        """Read a ``datasets`` source once to count its blocks (it has no byte size to estimate from)."""
        self._say("counting the blocks of this increment to plan its schedule")
        blocks = 0
        for lane in lane_positions(self.stream.state_dict()):
            counter = self._make_stream([Path(s) for s in lane["shards"]])
            counter.load_state_dict(lane)
            while chunk := counter.take(1024):
                blocks += len(chunk)
                if self.stop is not None and self.stop.requested:
                    return float(blocks)  # train() stops before the first step; the estimate no longer matters
        return float(blocks)

    def _correct_horizon(self) -> None:
        """Re-estimate the schedule from what the stream has read so far (exact at the end of the data).

        Deterministic in the stream's position, so a resumed run corrects it the same way.
        """
        remaining = self.stream.remaining_blocks_estimate()
        run = self.recipe.run
        if remaining is None:
            return
        if self.recipe.replay.mode == "displace":
            horizon = math.ceil((self.state.new_blocks + remaining) / self._planned_blocks_per_step())
        else:
            horizon = self.state.step + math.ceil(remaining / self._new_blocks_per_step())
        if run.max_steps is not None:
            horizon = min(horizon, run.max_steps)
        elif run.max_tokens is not None:
            horizon = min(horizon, max(1, math.ceil(run.max_tokens / (self.recipe.batch.size * self.recipe.data.block_size))))
        horizon = max(horizon, self.state.step, 1)
        if horizon != self.state.horizon:
            self.state.horizon = horizon
            self._set_lr()

    def _seed_replay(self) -> None:
        """Warm-start the replay buffer from ``replay.seed_from`` (a brand-new run only)."""
        from olm_cli.replay import seed_buffer

        cap = self.recipe.replay.seed_samples
        if self.recipe.replay.seed_from == "generate":
            blocks = self._generate_replay_seed()
            if not blocks:
                return  # stopped mid-generation: train() stops before its first step, the rerun continues
            cap = len(blocks)
        else:
            paths = discover_shards(self.recipe.replay.seed_from, setting="replay.seed_from")
            self._say(f"warm-starting the replay buffer from {len(paths)} file(s) of replay.seed_from")
            # The recipe's data settings (format, text field, domains) apply to seed files as to shards.
            blocks = self._make_stream(paths).take(cap)
        k = self.recipe.replay.store_logits_topk
        if k > 0:
            # Stored-logits distillation needs the starting model's logits for the seed blocks too.
            self._seed_with_logits(blocks, k)
        else:
            seed_buffer(self.replay, blocks)
        self._say(f"replay buffer warm-started with {min(len(blocks), cap)} blocks from replay.seed_from")

    def _generate_replay_seed(self) -> list[Block]:
        """The starting model's own samples (``replay.seed_from: generate``, olm_cli/replay/seed_generate.py)."""
        from olm_cli.replay.seed_generate import generate_seed_blocks

        recipe = self.recipe
        if recipe.model.init == "scratch":
            self._say("[yellow]warning:[/] replay.seed_from generate samples a model initialised from scratch: "
                      "its samples are noise (meant for a pretrained model whose data you do not have)")
        blocks, cost = generate_seed_blocks(
            self.accelerator.unwrap_model(self.model), self.tokenizer, recipe.replay.generate, run_dir=self.run_dir,
            seed=recipe.run.seed, block_size=recipe.data.block_size, device=self.accelerator.device, say=self._say,
            stop=self.stop, lockstep=self.distributed.sharded,
        )
        if cost is not None:
            self._say(f"generated {cost.samples} replay seed sample(s): {cost.generated_tokens:,} tokens in "
                      f"{cost.seconds:.1f}s ({cost.generated_tokens / max(cost.seconds, 1e-9):,.0f} tokens/s)"
                      + (f", {cost.resumed_batches} batch(es) from an interrupted run" if cost.resumed_batches else ""))
        return blocks

    @torch.no_grad()
    def _seed_with_logits(self, blocks: list[Block], k: int) -> None:
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        size = self.recipe.batch.micro_batch
        for i in range(0, len(blocks), size):
            chunk = blocks[i : i + size]
            batch = {n: t.to(self.accelerator.device) for n, t in collate([b.tokens for b in chunk], self.pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            self.replay.add(chunk, 0, logits=capture_topk(logits, [len(b) for b in chunk], k))
        model.train(was_training)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainOutcome:
        recipe, accelerator, model, state = self.recipe, self.accelerator, self.model, self.state
        self.loop_started = time.monotonic()
        first_step = state.step
        # Rate and ETA count only what this invocation trains (a resume starts mid-increment).
        self.loop_first = (state.step, state.tokens)
        stopping = contextlib.nullcontext(self.stop) if self.stop is not None else GracefulStop()
        # closing: the read-ahead worker stops with the loop (the increment's end reads inline).
        with stopping as stop, self._progress() as progress, contextlib.closing(self.stream):
            task = progress.add_task(f"increment {state.increment}", total=state.horizon, completed=state.step) if progress else None
            while not self._increment_done():
                # At least one step per invocation, so a budget shorter than start-up still progresses.
                over_budget = recipe.run.time_budget is not None and time.monotonic() - self.started >= recipe.run.time_budget
                # Every rank takes the same branch: a signal or a clock seen by one rank is agreed on by all.
                stopped, over_budget = agree_to_stop(stop, over_budget=over_budget)
                if stopped and state.step == first_step:
                    # Nothing trained in this invocation: nothing to save.
                    where = f"continues from {self.latest.name}" if self.resuming and self.latest else "starts this increment again"
                    return self._outcome("interrupted", stop.exit_code, None,
                                         f"stopped by signal {stop.signal} before the first step; the next run {where}")
                if stopped:
                    path = self._checkpoint(complete=False)
                    return self._outcome("interrupted", stop.exit_code, path,
                                         f"stopped by signal {stop.signal}; checkpoint written, the next run continues")
                if over_budget and state.step > first_step:
                    path = self._checkpoint(complete=False)
                    return self._outcome("time_budget", EXIT_OK, path,
                                         "time budget reached; checkpoint written, the next run continues")
                t0 = time.perf_counter()

                # select: a candidate pool of new blocks, scored by the selector.
                plan = self.policy.plan()
                n_replay = self._replay_share(plan.samples)
                n_new = plan.samples - n_replay
                # A whole replay step (possible when the batch is small) takes no new data.
                pool = self.stream.take(n_new * self.selector.pool_factor) if n_new else []
                state.new_blocks += len(pool)
                if not pool and n_new:
                    break
                selection = (self.selector.select(accelerator.unwrap_model(model), pool, min(n_new, len(pool)), self.pad_id)
                             if pool else Selection([], None, None, 0))
                state.unselected += selection.unselected
                new_blocks = [pool[i] for i in selection.indices]
                new_weights = selection.weights if selection.weights is not None else np.ones(len(new_blocks))
                if not new_blocks and n_new:
                    # A threshold selector may reject a whole pool; those blocks are counted as
                    # unselected and the step is taken on the next pool.
                    self._mark_finished_shards()
                    continue

                # batch + mix replay.
                replayed = self.replay.sample(n_replay) if n_replay else []
                samples = [b.tokens for b in new_blocks] + [r.tokens for r in replayed]
                weights = np.concatenate([np.asarray(new_weights, dtype=np.float64), [r.weight for r in replayed]])
                stored = self._stored_logits(new_blocks, replayed)

                # forward → losses → backward (micro-batches; OOM backs off without losing the batch).
                accumulated = self._forward_backward(samples, weights, stored, plan.micro_batch, n_new=len(new_blocks))

                # clip on the device, then the step's one host transfer (docs/architecture.md):
                # the loss, every sample's loss and the gradient norm, together.
                measured = fetch_step(accumulated, self._clip())
                loss, grad_norm, per_sample = measured.loss, measured.grad_norm, measured.per_sample

                # step: a non-finite loss or gradient never reaches the weights (as GradScaler and Megatron do).
                if measured.bad_loss is not None:
                    self._skip_batch(f"non-finite loss ({measured.bad_loss})", loss=measured.bad_loss)
                    continue
                if not math.isfinite(grad_norm):
                    self._skip_batch(f"non-finite gradient norm ({grad_norm})", loss=loss, grad_norm=grad_norm)
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.meta.after_step(accelerator.unwrap_model(model))  # Reptile's outer step every k steps
                self.bad_steps = 0
                state.step += 1
                state.global_step += 1
                self._set_lr()

                # bookkeeping, observe, log.
                seconds = time.perf_counter() - t0
                step_tokens = self._bookkeep(new_blocks, replayed, selection, per_sample, accumulated.new_logits)
                self.policy.observe(StepStats(loss=loss, grad_norm=grad_norm, samples=len(samples), tokens=step_tokens,
                                              seconds=seconds, pool_mean_entropy=selection.stats.get("pool_mean_entropy")))
                self._log_step(loss, grad_norm, step_tokens, seconds, new_blocks, replayed, selection, progress, task)

                # checkpoint.
                if state.step % recipe.run.checkpoint_every == 0 and not self._increment_done():
                    self._checkpoint(complete=False, background=True)

        return self._finish_increment()

    def _forward_backward(self, samples: list[np.ndarray], weights: np.ndarray, stored: Any, micro_batch: int,
                          n_new: int) -> AccumulatedBatch:
        """Accumulate gradients over micro-batches; the statistics stay on the device (no host sync)."""
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        # Every rank holds the same batch (same stream, selector and replay state); each computes
        # the gradient of its slice and DDP averages them. Each slice is divided by the whole
        # batch's weight over the world size, so an uneven split (3 samples on 2 ranks, the last
        # batch of an increment) trains the batch mean one process would.
        mine = list(range(rank, len(samples), world))
        norm = float(sum(weights)) / world
        if not mine:  # fewer samples than ranks: this rank's backward takes part in the reduction, adding nothing
            mine, weights = [0], np.zeros_like(weights)
        topk = self.recipe.replay.store_logits_topk  # 0 unless replay keeps logits for distillation
        alpha = self.recipe.distill.alpha
        device = accelerator.device
        while True:
            try:
                accumulated = AccumulatedBatch(samples=len(samples), rows=mine, new_logits=[] if topk else None)
                chunks = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
                for c, chunk in enumerate(chunks):
                    host = collate([samples[i] for i in chunk], self.pad_id)
                    host["weights"] = torch.as_tensor(weights[chunk], dtype=torch.float32)
                    batch = to_device(host, device)
                    sample_weights = batch.pop("weights")
                    last = c == len(chunks) - 1
                    sync = (gradient_sync(self.model, last) if self.distributed.sharded
                            else contextlib.nullcontext() if last else accelerator.no_sync(self.model))
                    with sync, accelerator.autocast():
                        # The penalty before the forward: FSDP2's parameters are all sharded then.
                        penalty = self.regularizer.penalty(accelerator.unwrap_model(self.model))
                        row_loss, logits = self._row_losses(batch)
                        chunk_stored = None
                        if stored is not None:
                            width = batch["input_ids"].shape[1]
                            chunk_stored = tuple(t.to(device) for t in collate_stored([stored[i] for i in chunk], width))
                        loss = training_loss(
                            (row_loss * sample_weights).sum() / norm,
                            self.distiller.loss(logits, batch, chunk_stored),
                            penalty,
                            alpha=alpha, share=len(chunk) / len(mine),
                        )
                    # A non-finite loss is found by fetch_step, with the gradient norm: its
                    # gradients are dropped there, never stepped on.
                    accelerator.backward(loss)
                    accumulated.add(loss, row_loss)
                    if accumulated.new_logits is not None:
                        # Stored-logit distillation keeps the new samples' top-k on the host (one more transfer).
                        rows = [row for row, index in enumerate(chunk) if index < n_new]
                        accumulated.new_logits.extend(capture_topk(logits[rows], [len(samples[chunk[r]]) for r in rows], topk))
                self.micro_batch_used = micro_batch
                return accumulated
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not self.policy.on_oom():
                    raise OlmError("out of memory even with micro-batch 1; use a smaller model, block_size or dtype") from None
                micro_batch = self.policy.plan().micro_batch
                self._say(f"[yellow]out of memory:[/] retrying the same batch with micro-batch {micro_batch}")

    def _row_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Each row's mean token loss, and the logits (None under the chunked loss, which never builds them).

        No attention mask: batches are right-padded, so under causal attention no real token
        sees a pad and the padded positions are out of the loss (see use_causal_attention_only).
        """
        if self.chunked_loss is not None:
            return self.chunked_loss(self.forward_model, batch), None
        logits = self.forward_model(input_ids=batch["input_ids"], use_cache=False).logits
        return per_sample_loss(logits, batch["labels"])[0], logits

    def _stored_logits(self, new_blocks: list[Block], replayed: list[Any]) -> list[tuple[np.ndarray, np.ndarray] | None] | None:
        """Per-sample stored top-k logits (None for fresh samples), for a distiller that uses them."""
        if not self.distiller.needs_stored_logits or not replayed:
            return None
        entries: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(new_blocks)
        for item in replayed:
            has = item.logits_values is not None and item.logits_indices is not None
            entries.append((item.logits_values, item.logits_indices) if has else None)
        return entries

    def _replay_share(self, samples: int) -> int:
        if len(self.replay) == 0 or self.recipe.replay.ratio <= 0:
            return 0
        # Stochastic rounding keeps the long-run replay fraction equal to the ratio even when
        # ratio * batch is below one (1% of 16 samples replays one sample every ~6 steps).
        # numpy's global generator is checkpointed, so resumes draw the same shares.
        # With one sample per step (batch.size 1) that makes whole replay steps at the same rate.
        exact = self.recipe.replay.ratio * samples
        share = int(exact) + int(np.random.random() < exact - int(exact))
        return min(samples, share, len(self.replay))

    def _bookkeep(self, new_blocks: list[Block], replayed: list[Any], selection: Any, per_sample: np.ndarray,
                  new_logits: list[tuple[np.ndarray, np.ndarray]] | None) -> int:
        """Replay insertion and re-scoring (this step's losses, no second forward), ledger counts."""
        state = self.state
        step_tokens = sum(len(b) for b in new_blocks) + sum(len(r.tokens) for r in replayed)
        state.tokens += step_tokens
        state.total_tokens += step_tokens
        n = len(new_blocks)
        scores = selection.scores[selection.indices] if selection.scores is not None else per_sample[:n]
        self.replay.add(new_blocks, state.global_step, scores=[float(s) for s in scores], logits=new_logits)
        if replayed:
            self.replay.update_scores([r.id for r in replayed], [float(s) for s in per_sample[n:]])
        for block in new_blocks:
            state.domain_tokens[block.domain] = state.domain_tokens.get(block.domain, 0) + len(block)
            for shard, tokens in block.token_spans():  # a block may hold the tail of one shard and the next's head
                if shard in self.ledger:
                    self.ledger.add_tokens(shard, tokens)
        self._mark_finished_shards()
        self._correct_horizon()
        return step_tokens

    def _mark_finished_shards(self) -> None:
        """Shards whose last token has been trained: done, or quarantined at a bad record (its
        earlier records stay trained and counted)."""
        for shard in self.stream.take_finished_shards():
            if shard not in self.ledger:
                continue
            problem = self.stream.shard_problem(shard)
            if problem is not None:
                self.ledger.quarantine(shard, problem)
            else:
                self.ledger.mark_done(shard, 0, self.state.increment, long_documents=self.stream.long_document_counts(shard))

    def _increment_done(self) -> bool:
        run = self.recipe.run
        if run.max_tokens is not None and self.state.tokens >= run.max_tokens:
            return True
        # Only max_steps ends an increment by step count. A token budget, or one pass over the
        # new shards, uses its step estimate for the schedule alone (past it the learning rate
        # stays at its floor), so no leftover blocks are carried into an otherwise empty night.
        if run.max_steps is not None and self.state.step >= run.max_steps:
            return True
        if self.recipe.replay.mode == "displace" and self.state.step >= self.state.horizon:
            # The steps its new data alone would take; what is left is carried (when nothing
            # is, the next take finds the end and closes the last shard in this increment).
            remaining = self.stream.remaining_blocks_estimate()
            if remaining is None or remaining >= 1:
                return True
        return self.stream.exhausted

    def _skip_batch(self, what: str, *, loss: float, grad_norm: float | None = None) -> None:
        """Drop this batch's gradients without stepping; stop after ``run.max_bad_steps`` in a row.

        The skipped step is logged (strict JSON, the non-finite values as null) so a run's metrics
        show every batch that did not reach the weights.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        limit = self.recipe.run.max_bad_steps
        state = self.state
        self._say(f"[yellow]warning:[/] {what} at step {state.global_step + 1}; batch skipped ({self.bad_steps}/{limit})")
        self._log({"step": state.global_step + 1, "increment": state.increment, "increment_step": state.step + 1,
                   "skipped": True, "loss": loss, "grad_norm": grad_norm, "reason": what})
        if self.bad_steps >= limit:
            raise self._diverged()
        return None

    def _diverged(self) -> TrainingDivergedError:
        """The error that ends a run whose last ``bad_steps`` batches were all skipped.

        When this run saved the very weights the streak ran on (a checkpoint at the current
        step), they are finite but diverged: ``latest`` steps back past them, so lowering the
        learning rate is enough for the next night to succeed.
        """
        self._settle_checkpoint()  # a checkpoint still being written is latest (and may be the diverged one)
        where = (f"rolled back to {self.latest.name} (verified finite)" if self.latest is not None
                 else "no checkpoint was written")
        diverged_here = (self.latest is not None and self.latest in self.saved_here
                         and step_of(self.latest) == self.state.global_step)
        if diverged_here and self.accelerator.is_main_process:
            assert self.latest is not None
            older = self.checkpoints.step_back(self.latest)
            if older is not None:
                where = (f"rolled back to {older.name} (verified finite; {self.latest.name} holds the weights "
                         "that diverged and is no longer latest)")
                self.latest = older
        return TrainingDivergedError(
            f"loss or gradients were NaN/Inf for {self.bad_steps} consecutive steps; {where}. "
            "Lower optim.lr or check the data"
        )

    def _clip(self) -> torch.Tensor | float:
        """The gradient norm before clipping, left on the device for :func:`fetch_step`."""
        clip = self.recipe.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm: torch.Tensor | float = self.accelerator.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        return replicated(norm)  # sharded parameters give a DTensor norm

    def _set_lr(self) -> None:
        o = self.recipe.optim
        if o.schedule == "wsd":  # warm-up once per run directory, then constant (olm_cli/schedule.py)
            mult = wsd_multiplier(self.state.global_step, warmup=o.warmup_steps)
        else:
            mult = lr_multiplier(self.state.step, warmup=o.warmup_steps, horizon=self.state.horizon,
                                 schedule=o.schedule, min_ratio=o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * mult

    # ------------------------------------------------------------------ checkpoint / finish

    def _finish_increment(self) -> TrainOutcome:
        self.stream.at_end()  # close a shard whose last block was the last one trained
        self._mark_finished_shards()
        reading = self.lanes.reading_summary()  # a collective: which rank read which lanes
        if reading is not None:
            self._say(reading)
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.meta.end_increment(unwrapped)  # the last, shorter Reptile window
        self.regularizer.end_increment(unwrapped, self._consolidation_data)
        path, full_state_dict = self._checkpoint_with_weights(complete=True)
        state = self.state
        self._say(f"increment {state.increment} complete: {state.step} steps, {state.tokens:,} tokens → {path}")
        result = self._release(path, full_state_dict)
        if result is None:
            return self._cooldown_stopped(path)
        released, message = result
        if not released:
            return self._outcome("not_released", EXIT_NOT_RELEASED, path, message)
        return self._outcome("increment_complete", EXIT_OK, path)

    def _release(self, trunk: Path, full_state_dict: dict[str, torch.Tensor] | None) -> tuple[bool, str] | None:
        """Evaluate and release what the increment releases (the trunk, its SMA or its cooldown branch,
        olm_cli/release_branch.py); None when a signal stopped the cooldown (checkpointed, the next run finishes it)."""
        from olm_cli.publish import evaluate_and_release
        from olm_cli.release_branch import build_release_model

        state = self.state
        try:
            release = build_release_model(self, trunk, full_state_dict)
            if release is None:
                return None
            released, message = True, ""
            if self.accelerator.is_main_process:
                model = release.model
                if is_sharded(model):  # evaluated on rank 0 alone: a plain model of the gathered weights
                    from olm_cli.distributed.sharding import plain_model

                    assert release.state_dict is not None
                    model = plain_model(model, dict(release.state_dict), device=self.accelerator.device)
                # The checkpoint is training state; what serving reads is the release, behind the gate.
                result = evaluate_and_release(self.recipe, model, self.tokenizer, increment=state.increment,
                                              step=state.global_step, checkpoint=trunk,
                                              trained=dict(state.domain_tokens), tokens_trained=state.total_tokens,
                                              state_dict=release.state_dict, console=self.console,
                                              trackers=self.trackers, origin=release.origin)
                if result is not None:
                    released, message = result.released, result.message
                release.released()
            released, message = _from_main_process(self.accelerator, (released, message))
        finally:
            self.accelerator.end_training()
            self.replay.close()
        return released, message

    def _cooldown_stopped(self, trunk: Path) -> TrainOutcome:
        code = self.stop.exit_code if self.stop is not None else EXIT_OK
        return self._outcome("interrupted", code, trunk, f"stopped during the cooldown of increment "
                             f"{self.state.increment}; its checkpoint is written and the next run finishes it")

    def setup_pending_release(self) -> None:
        """Set up only what the cooldown of a checkpointed, unreleased increment needs (``optim.schedule: wsd``).

        The trunk's final checkpoint is ``latest``; nothing of a new increment begins (no ledger
        change, no stream position), so the next run plans its increment as if none of this happened.
        """
        assert self.latest is not None
        transformers.utils.logging.disable_progress_bar()
        self._setup_accelerator()
        model = self._setup_model()
        self._setup_parts()
        model = self.partial.prepare(model, self.state.increment)
        self.model, self.optimizer = self._prepare(model)  # sharded under run.distributed: fsdp
        self._setup_speed_options()
        self.shard_plan = [Path(p) for p in self.state.shard_plan]
        self._restore_parts(self.latest)
        # The release's eval reaches the trackers as an uninterrupted night's would (closed by finish).
        self.trackers = Trackers.open(self.recipe, main_process=self.accelerator.is_main_process, say=self._say)

    def finish_pending_release(self) -> Any:
        """The cooldown (continued from its checkpoint) and release of the increment ``latest`` completed.

        Returns the release result, or a TrainOutcome when a signal stopped the cooldown again.
        """
        from olm_cli.release_branch import ReleaseOutcome

        assert self.latest is not None
        self._say(f"increment {self.state.increment} was checkpointed ({self.latest.name}) but not released; "
                  "finishing its cooldown and releasing it now")
        with contextlib.closing(self.trackers):
            result = self._release(self.latest, None)
        if result is None:
            return self._cooldown_stopped(self.latest)
        released, message = result
        return ReleaseOutcome(released, message)

    def _outcome(self, status: str, code: int | None, path: Path | None, message: str = "") -> TrainOutcome:
        return TrainOutcome(status, EXIT_OK if code is None else code, self.state.increment, self.state.step,
                            self.state.tokens, str(path) if path is not None else None, message)

    def _consolidation_data(self, n: int) -> list[dict[str, torch.Tensor]]:
        """Up to ``n`` batches for a regulariser to consolidate on: replayed samples, else this increment's data."""
        size = self.recipe.batch.micro_batch
        tokens: list[np.ndarray] = []
        if len(self.replay):
            state = np.random.get_state()  # drawing these must not shift the run's random stream
            tokens = [item.tokens for item in self.replay.sample(min(len(self.replay), n * size))]
            np.random.set_state(state)
        if not tokens:
            # The increment's own data, read with the recipe's data settings (also a streamed dataset).
            tokens = [b.tokens for b in self._make_stream(bad_records="quarantine").take(n * size)]
        device = self.accelerator.device
        return [{k: v.to(device) for k, v in collate(tokens[i : i + size], self.pad_id).items()}
                for i in range(0, min(len(tokens), n * size), size)]

    def _checkpoint(self, *, complete: bool, background: bool = False) -> Path:
        return self._checkpoint_with_weights(complete=complete, background=background)[0]

    def _checkpoint_with_weights(self, *, complete: bool, background: bool = False
                                 ) -> tuple[Path, dict[str, torch.Tensor] | None]:
        """Write a checkpoint of everything; returns it and, under FSDP/DeepSpeed, the gathered weights.

        ``background`` (the loop's periodic checkpoints, with ``run.async_checkpoint``): the state
        is copied to host memory here, at the step boundary, and written while training goes on;
        it becomes ``latest`` when :meth:`_settle_checkpoint` collects it. The previous write is
        always settled first, so checkpoints publish in step order, one at a time.
        """
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        self._settle_checkpoint()
        if self.bad_steps:
            # The last batches were all skipped (the data ran out, a signal or the time budget
            # came mid-streak): the weights that produced them must not become the rollback target.
            raise self._diverged()
        self._require_finite_weights()
        step = self.state.global_step
        path = self.checkpoints.root / checkpoint_name(step)
        # FSDP/DeepSpeed shard the weights: every rank takes part in gathering the full state dict.
        full_state_dict = self._gathered_weights()
        # Every rank: the lanes' positions are gathered from the ranks that read them (a collective).
        stream_position = self.stream.state_dict()
        # Anchors and Fisher are sharded like the weights: gathered the same way (a collective).
        part_states = self._part_states()
        if accelerator.is_main_process:
            self.state.increment_complete = complete
            self.stream_position = stream_position  # in parts: it may hold the shuffle buffer's arrays
            self.state.stream = json_position(self.stream_position)  # for the torch-free planner
            self.state.ledger = self.ledger.state_dict()
            self.state.shard_plan = [str(p) for p in self.shard_plan]
            in_background = background and self.checkpoint_writer.background
            snapshot = self._snapshot(full_state_dict, part_states, private=in_background)
            # The replay snapshot reads the live buffer: staged now (hard links, cheap), in this thread.
            self.checkpoints.stage(step, lambda directory: self.replay.save(directory / "replay"))
        if self.distributed.sharded:
            # Every rank writes its optimiser shard into the staged directory, before it is published.
            from olm_cli.distributed.sharded_checkpoint import save_sharded_optimizer

            save_sharded_optimizer(self.checkpoints.staged_path(step), self.model, self.optimizer)
        if accelerator.is_main_process:
            metadata = {"increment": self.state.increment, "complete": complete, "finite": True}
            self.checkpoint_writer.submit(functools.partial(self._publish, step, snapshot, metadata))
            if not in_background:
                self._settle_checkpoint()
        accelerator.wait_for_everyone()
        return path, full_state_dict

    def _gathered_weights(self) -> dict[str, torch.Tensor] | None:
        """The full weights when they are sharded (a collective; rank 0 holds them), else None."""
        if self.distributed.sharded:
            from olm_cli.distributed.sharding import full_state_dict

            return full_state_dict(self.model)
        if self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            return self.accelerator.get_state_dict(self.model)
        return None

    def _part_states(self) -> dict[str, Any]:
        """The state of the parts that keep per-parameter tensors, whole (gathered on every rank under FSDP)."""
        states = {"regularizer": self.regularizer.state_dict(), "meta": self.meta.state_dict()}
        if not self.distributed.sharded:
            return states
        from olm_cli.distributed.sharded_state import gather_parameter_state

        return gather_parameter_state(states, self.model)

    def _snapshot(self, full_state_dict: dict[str, torch.Tensor] | None, part_states: dict[str, Any], *,
                  private: bool) -> TrainingSnapshot:
        """Everything the checkpoint holds (but the replay buffer) as of this step; ``private``: in host
        memory of its own, so training may go on while it is written (docs/run-directory.md)."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        # FSDP/DeepSpeed gathered the full weights; otherwise the model as saved (LoRA adapters merged).
        model = unwrapped if full_state_dict is not None else self.partial.for_save(unwrapped)
        parts = {
            "selector": self.selector.state_dict(),
            "batch": self.policy.state_dict(),
            "distiller": self.distiller.state_dict(),
            **part_states,  # regularizer, meta
            "partial": self.partial.state_dict(),
            "stream": self.stream_position,
        }
        return TrainingSnapshot(
            model=model,
            weights=host_copy(full_state_dict if full_state_dict is not None else model.state_dict(), copy=private),
            tokenizer=self._writer_tokenizer,
            # Under FSDP every rank has written its shard already (optimizer-sharded/).
            optimizer=None if self.distributed.sharded else host_copy(self.optimizer.state_dict(), copy=private),
            rng=capture_rng(),
            parts=host_copy(parts, copy=private),
            trainer_state=json.dumps(self.state.stamped(), indent=1),
            ledger=self.ledger.state_dict(),
        )

    @functools.cached_property
    def _writer_tokenizer(self) -> Any:
        """The tokenizer the checkpoint writer saves: a copy made once, as the data pipeline may be using
        the original in another thread meanwhile (a Rust tokenizer refuses two borrowers at once)."""
        return copy.deepcopy(self.tokenizer)

    def _publish(self, step: int, snapshot: TrainingSnapshot, metadata: dict[str, Any]) -> Path:
        """Write ``snapshot`` into the staged checkpoint and publish it (in the writer's thread, or this one)."""
        path = self.checkpoints.save(step, snapshot.write, metadata=metadata, staged=True)
        # The view `olm status` reads moves only once latest has: the ledger as of that checkpoint.
        write_json_atomic(self.ledger.path, snapshot.ledger)
        return path

    def _settle_checkpoint(self) -> None:
        """Wait for a checkpoint still being written; once published it is ``latest``.

        A failed write (a full disk) raises its CheckpointError here, and ``latest`` stays the
        previous checkpoint; the steps trained since are lost, as they would be by a crash.
        """
        path = self.checkpoint_writer.wait()
        if path is not None:
            self.latest = path
            self.saved_here.add(path)

    @contextlib.contextmanager
    def checkpoint_writes(self) -> Iterator[None]:
        """Around :meth:`train`: no checkpoint write outlives it (the caller releases the run lock next).

        Training's own error is the one raised; a background write that failed as well is then
        reported as a warning line (``latest`` is what was really published either way).
        """
        from rich.markup import escape

        try:
            yield
        except BaseException:
            try:
                self._settle_checkpoint()
            except Exception as exc:  # the training error is the one to report
                self._say(f"[yellow]warning:[/] {escape(str(exc))}")
            raise
        self._settle_checkpoint()

    def _require_finite_weights(self) -> None:
        """Refuse to checkpoint NaN/Inf weights: every checkpoint (and so every rollback) is finite."""
        bad = nonfinite_parameters(self.model)
        if not bad:
            return
        where = (f"latest stays {self.latest.name} (verified finite)" if self.latest is not None
                 else "no checkpoint was written")
        raise TrainingDivergedError(
            f"{len(bad)} parameter tensor(s) became NaN/Inf by step {self.state.global_step} (first: {bad[0]}); "
            f"not checkpointed, {where}. Lower optim.lr or check the data"
        )

    def _restore_parts(self, checkpoint: Path) -> None:
        """Optimizer and strategy state; a file that cannot be read raises CheckpointLoadError.

        OlmErrors raised on purpose (a replay snapshot written under another policy) are about
        the recipe, not the files: no older checkpoint would fix them, so they propagate.
        """
        from olm_cli.distributed.sharded_checkpoint import restore_optimizer

        optimizer_state = None
        try:
            with loading_checkpoint(checkpoint, optimizer_file_label(checkpoint)):
                # A sharded optimiser state (run.distributed: fsdp) is read at any world size; so is a
                # whole one into a sharded model. Otherwise: optimizer.pt in a checkpoint of olm 0.2.
                if not restore_optimizer(checkpoint, self.model, self.optimizer, sharded=self.distributed.sharded):
                    optimizer_state = load_optimizer_state(checkpoint)
            if optimizer_state is not None:
                self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError) as exc:
            # Trainable parameters changed (e.g. a new `train.trainable`): start fresh moments.
            logger.warning("optimizer state not restored (%s); starting with fresh AdamW moments", exc)
        with loading_checkpoint(checkpoint, "the strategy state", keep=(OlmError,)):
            parts = load_tree(checkpoint / "parts")
            if "regularizer" not in parts and (checkpoint / "regularizer").is_dir():
                parts["regularizer"] = legacy_state(checkpoint / "regularizer")  # a checkpoint of olm 0.1
            if self.distributed.sharded:  # anchors and Fisher are saved whole: this rank keeps its rows
                from olm_cli.distributed.sharded_state import local_parameter_state

                for name in ("regularizer", "meta"):
                    parts[name] = local_parameter_state(parts.get(name, {}), self.model)
            self.selector.load_state_dict(parts.get("selector", {}))
            self.policy.load_state_dict(parts.get("batch", {}))
            self.distiller.load_state_dict(parts.get("distiller", {}))
            self.regularizer.load_state_dict(parts.get("regularizer", {}))
            self.meta.load_state_dict(parts.get("meta", {}))
            self.partial.load_state_dict(parts.get("partial", {}))
            self.restored_stream = parts.get("stream")  # absent in checkpoints of olm 0.2: trainer_state.json's
        with loading_checkpoint(checkpoint, "the replay buffer", keep=(OlmError,)):
            if (checkpoint / "replay").exists():  # absent when the run had no replay until now
                self.replay.load(checkpoint / "replay")

    # ------------------------------------------------------------------ output

    def _log_step(self, loss: float, grad_norm: float, step_tokens: int, seconds: float, new_blocks: list[Block],
                  replayed: list[Any], selection: Any, progress: Any, task: Any) -> None:
        state = self.state
        lr = self.optimizer.param_groups[0]["lr"]
        rate = step_tokens / max(seconds, 1e-9)
        if state.step % self.recipe.run.log_every == 0:
            domains = Counter(b.domain for b in new_blocks)
            self._log({
                "step": state.global_step, "increment": state.increment, "increment_step": state.step,
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.total_tokens, "tokens_per_s": rate,
                "domain": domains.most_common(1)[0][0] if domains else None,
                "batch_size": len(new_blocks) + len(replayed), "micro_batch": self.micro_batch_used,
                "replayed": len(replayed), "unselected": state.unselected,
                **{k: float(v) for k, v in selection.stats.items()}, "time": time.time(),
                "cpu_time": time.process_time(),
            })
        if progress is not None:
            progress.update(task, completed=state.step,
                            description=f"increment {state.increment} loss {loss:.3f} lr {lr:.2e} {rate:,.0f} tok/s")
        elif state.step % max(1, state.horizon // 10) == 0 or state.step == 1:
            self._report_plain(loss, lr)

    def _report_plain(self, loss: float, lr: float) -> None:
        """Progress for logs (cron, systemd): a line every tenth of the increment."""
        state = self.state
        elapsed = time.monotonic() - self.loop_started
        first_step, first_tokens = self.loop_first
        rate = (state.tokens - first_tokens) / max(elapsed, 1e-9)
        done = state.step - first_step
        eta = elapsed / done * max(0, state.horizon - state.step) if done else 0.0
        self._say(f"increment {state.increment} step {state.step}/{state.horizon} loss {loss:.4f} lr {lr:.2e} "
                  f"{rate:,.0f} tok/s ETA {eta:,.0f}s")

    def _log(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        row = strict_json_row(row)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        self.trackers.log_step(row)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines written after the checkpoint we resume from (they will be re-done)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists() or not self.accelerator.is_main_process:
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by the crash
        write_text_atomic(path, "".join(line + "\n" for line in kept))

    def _progress(self) -> Any:
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        show = (self.recipe.run.progress and self.console is not None and self.console.is_terminal
                and self.accelerator.is_main_process)
        if not show:
            return contextlib.nullcontext(None)
        return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=False)

    def _say(self, message: str) -> None:
        accelerator = getattr(self, "accelerator", None)
        if self.console is not None and (accelerator is None or accelerator.is_main_process):
            self.console.print(message)


def _from_main_process(accelerator: Any, value: Any) -> Any:
    """The main process's ``value`` on every rank, so all ranks exit with the same code."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def strict_json_row(row: dict[str, Any]) -> dict[str, Any]:
    """Non-finite floats become null and are named in ``nonfinite``, so every line is strict JSON."""
    bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return row
    return {**{k: (None if k in bad else v) for k, v in row.items()}, "nonfinite": bad}
