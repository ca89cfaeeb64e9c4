"""The training engine: one increment of continual training, readable top to bottom.

``Trainer.setup()`` loads everything in dependency order (lock → checkpoint → ledger and plan →
model and tokenizer → strategies → optimiser → data position). ``Trainer.train()`` runs the
step::

    select → batch → mix replay → forward → losses (task + distillation + regulariser)
           → backward → step → log → checkpoint

Strategies (selectors, batch policies, replay, distillation, regularisers) plug into that line
through their small protocols; none of them re-implements the loop. Everything needed to
continue lives in the checkpoint, so a run killed at any moment resumes bit-identically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import socket
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

from olm_cli.batching import StepStats
from olm_cli.data import (
    BlockStream,
    discover_shards,
    is_dataset_source,
)
from olm_cli.distill import collate_stored, topk_logits
from olm_cli.errors import EXIT_NOT_RELEASED, EXIT_OK, OlmError, TrainingDivergedError
from olm_cli.increment import TRAINER_STATE, IncrementPlan, TrainOutcome
from olm_cli.modeling import save_tokenizer
from olm_cli.recipe import Recipe
from olm_cli.rundir import GracefulStop
from olm_cli.rundir.atomic import apply_umask, write_text_atomic
from olm_cli.rundir.checkpoint import loading_checkpoint, step_of
from olm_cli.samples import Block, collate, per_sample_loss
from olm_cli.selectors.contract import Selection
from olm_cli.state_files import load_tree, save_tree

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- schedule


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
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel (CPU and CUDA) does the whole update in one pass per group.
    fused = all(p.is_floating_point() for group in groups for p in group["params"])
    return torch.optim.AdamW(groups, lr=recipe.optim.lr, betas=recipe.optim.betas, eps=recipe.optim.eps, fused=fused)


# --------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _rng_to_tree(state: dict[str, Any]) -> dict[str, Any]:
    version, internal, gauss = state["python"]
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    tree: dict[str, Any] = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {"name": np_name, "keys": np_keys, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": state["torch"],
    }
    if "cuda" in state:
        tree["cuda"] = {str(i): s for i, s in enumerate(state["cuda"])}
    return tree


def _restore_rng(tree: dict[str, Any]) -> None:
    py = tree["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npy = tree["numpy"]
    np.random.set_state((npy["name"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(tree["torch"])
    if "cuda" in tree and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tree["cuda"][k] for k in sorted(tree["cuda"], key=int)])


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
        self.checkpoints = plan.checkpoints
        self.latest = plan.latest
        self.state = plan.state
        self.ledger = plan.ledger
        self.resuming = plan.resuming
        self.shard_plan = plan.shards
        self.carried_state = plan.carried_state

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        """Load model, tokenizer, strategies, optimiser and data position (in that order)."""
        from accelerate import Accelerator

        from olm_cli.batching import BATCH_POLICIES
        from olm_cli.distill import build_distiller, build_regularizer
        from olm_cli.modeling import load_pretrained, load_source, load_tokenizer
        from olm_cli.partial import PartialUpdates
        from olm_cli.replay import REPLAY_BUFFERS
        from olm_cli.selectors import SELECTORS
        from olm_cli.strategy import StrategyContext

        transformers.utils.logging.disable_progress_bar()
        recipe = self.recipe
        log_with = ["tensorboard"] if recipe.run.tensorboard else None
        self.accelerator = Accelerator(
            mixed_precision=recipe.run.mixed_precision,
            cpu=not torch.cuda.is_available(),
            log_with=log_with,
            project_dir=str(self.run_dir),
        )
        if log_with:
            self.accelerator.init_trackers("tensorboard")
        seed = recipe.run.seed

        # Model before optimiser; tokenizer before data.
        if self.latest is not None:
            # Any failure here is CheckpointLoadError: run_increment falls back to an older checkpoint.
            with loading_checkpoint(self.latest, "the model or tokenizer"):
                model = load_pretrained(str(self.latest), dtype=recipe.model.dtype)
                tokenizer = load_tokenizer(str(self.latest))
        else:
            model, tokenizer = load_source(recipe.model, shards=self.shard_plan, text_field=recipe.data.text_field, seed=seed,
                                           cache_dir=self.run_dir / "base-model", say=self._say)
        self.tokenizer = tokenizer
        self.pad_id = int(tokenizer.pad_token_id)

        self.increment = int(self.state["increment"]) if self.resuming else self.ledger.start_increment()
        self.partial = PartialUpdates(recipe.train)
        model = self.partial.prepare(model, self.increment)  # LoRA and trainable patterns
        context = StrategyContext(seed=seed, run_dir=self.run_dir, rank=self.accelerator.process_index,
                                  world_size=self.accelerator.num_processes, is_main=self.accelerator.is_main_process,
                                  recipe=recipe)
        self.selector = SELECTORS.build(recipe.selector, context)
        self.policy = BATCH_POLICIES.build(recipe.batch, context)
        self.replay = REPLAY_BUFFERS.build(recipe.replay, context)  # NoReplay for policy none
        self.distiller = build_distiller(recipe.distill, load_teacher=self._load_teacher)
        # LwF distils towards the model as the increment began; in the first increment of a
        # from-scratch run that is a random initialisation, which there is no point preserving.
        untrained_teacher = recipe.distill.method == "lwf" and recipe.model.init == "scratch" and self.increment == 1
        self.kd_active = self.distiller is not None and not untrained_teacher
        if self.distiller is not None and untrained_teacher:
            self._say("note: distill.method lwf is off in increment 1: the model starts from a random "
                      "initialisation, so there is nothing to preserve yet")
        self.regularizer = build_regularizer(recipe.regularize)

        optimizer = build_optimizer(model, recipe)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.stream = self._make_stream()
        self.stream.warn = lambda message: self._say(f"[yellow]warning:[/] {message}")

        self.step = 0  # optimizer steps in this increment
        self.tokens = 0  # tokens trained in this increment (new + replay)
        self.global_step = int(self.state.get("global_step", 0))
        self.total_tokens = int(self.state.get("total_tokens", 0))
        self.unselected = int(self.state.get("unselected", 0))
        self.bad_steps = 0  # consecutive skipped batches
        self.saved_here: set[Path] = set()  # checkpoints written by this invocation
        self.skipped_steps = 0  # skipped batches in this invocation
        self.domain_tokens: Counter[str] = Counter()

        if self.latest is not None:
            self._load_parts(self.latest)
        # Metric lines written after the checkpoint we start from belong to lost work.
        self._truncate_metrics(self.global_step)
        if self.resuming:
            self.step = int(self.state["step"])
            self.tokens = int(self.state["tokens"])
            self.domain_tokens = Counter(self.state.get("domain_tokens", {}))
            self.horizon = int(self.state["horizon"])
            self.stream.load_state_dict(self.state["stream"])
            with loading_checkpoint(self.latest, "the RNG state"):
                _restore_rng(load_tree(self.latest / "rng"))
            self._say(f"resuming increment {self.increment} at step {self.step} from {self.latest.name}")
            if self.kd_active:
                # LwF's teacher is the model as it was when this increment began, not at resume.
                start = self._increment_start_model() if recipe.distill.method == "lwf" else None
                self.distiller.begin_increment(start if start is not None else self.accelerator.unwrap_model(self.model))
        else:
            if self.carried_state is not None:
                self.stream.load_state_dict(_rebase_stream_state(self.carried_state, self.shard_plan))
            if self.latest is None or recipe.optim.reset_optimizer:
                self.optimizer.state.clear()
            self._say(f"increment {self.increment}: {len(self.shard_plan)} shard(s), "
                      + (f"starting from {self.latest.name}" if self.latest is not None else "starting from the base model"))
            self.horizon = self._horizon()
            torch.manual_seed(seed + self.increment)
            random.seed(seed + self.increment)
            np.random.seed((seed + self.increment) % 2**32)
            for path in self.shard_plan:
                if not is_dataset_source(path):
                    self.ledger.mark_in_progress(str(path), self.increment)
            unwrapped = self.accelerator.unwrap_model(self.model)
            if self.kd_active:
                self.distiller.begin_increment(unwrapped)
                if recipe.distill.method == "lwf" and self.accelerator.is_main_process:
                    self._save_increment_start(unwrapped)
            if self.regularizer is not None:
                self.regularizer.begin_increment(unwrapped)
            if recipe.replay.seed_from and self.latest is None:
                self._seed_replay()
            if self.latest is None and recipe.eval.sets and recipe.eval.after_increment and self.accelerator.is_main_process:
                # Row 0 of the continual-learning matrix: the model before any increment.
                from olm_cli.evaluation.domains import record_increment_eval

                self._say(f"evaluating the starting model on {len(recipe.eval.sets)} domain(s) (row 0 of the matrix)")
                record_increment_eval(self.run_dir, recipe, unwrapped, self.tokenizer, increment=0, trained={},
                                      step=self.global_step, console=self.console)
        self._set_lr()

    def _make_stream(self, shards: list[Path] | None = None) -> BlockStream:
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
            warn=None,  # only the training stream reports long documents (see setup)
        )

    def _horizon(self) -> int:
        """Schedule length of this increment: the recipe's budget, or one pass over the plan.

        The blocks the plan will yield are counted (tokenising is cheap next to training), at most
        as many as the budget needs, so a budget longer than the data is reported and the cosine
        is planned on the steps that will really run instead of ending early at a high rate.
        """
        run, batch = self.recipe.run, self.recipe.batch
        new_share = 1.0 - self.recipe.replay.ratio  # 0 with replay.policy none
        per_step = batch.size * new_share * self.selector.pool_factor  # new blocks consumed per step
        budget: int | None = None
        if run.max_steps is not None:
            budget = run.max_steps
        elif run.max_tokens is not None:
            budget = max(1, math.ceil(run.max_tokens / (batch.size * self.recipe.data.block_size)))
        if budget is not None and any(is_dataset_source(p) for p in self.shard_plan):
            return budget  # an endless stream: reading it twice to count would cost a second download
        cap = None if budget is None else math.ceil(budget * per_step)
        self._say("counting the blocks of this increment to plan its schedule")
        counter = self._make_stream()
        counter.load_state_dict(self.stream.state_dict())
        blocks = 0
        while (cap is None or blocks < cap) and (chunk := counter.take(1024 if cap is None else min(1024, cap - blocks))):
            blocks += len(chunk)
            if self.stop is not None and self.stop.requested:
                break  # train() stops before the first step; the estimate no longer matters
        in_data = max(1, math.ceil(blocks / per_step))
        if budget is None:
            return in_data
        if cap is not None and blocks < cap:
            key = "run.max_steps" if run.max_steps is not None else "run.max_tokens"
            value = run.max_steps if run.max_steps is not None else run.max_tokens
            self._say(f"[yellow]warning:[/] {key}={value} is more than this increment's data holds "
                      f"({blocks:,} blocks, about {in_data:,} steps); the schedule is planned on {in_data:,} steps")
            return in_data
        return budget

    def _save_increment_start(self, model: torch.nn.Module) -> None:
        """Keep the increment's starting weights so a resumed LwF run distils from the same teacher."""
        import shutil

        final = self.run_dir / "increment-start"
        tmp = self.run_dir / ".increment-start.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.partial.for_save(model).save_pretrained(tmp, safe_serialization=True)
        (tmp / "increment.json").write_text(json.dumps({"increment": self.increment}))
        apply_umask(tmp)  # safetensors writes 0600; a serving user must be able to read the run directory
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)

    def _increment_start_model(self) -> torch.nn.Module | None:
        from olm_cli.modeling import load_pretrained

        path = self.run_dir / "increment-start"
        try:
            if json.loads((path / "increment.json").read_text())["increment"] != self.increment:
                raise FileNotFoundError
        except (OSError, ValueError, KeyError):
            logger.warning("no saved start-of-increment model; LwF distils from the resumed weights")
            return None
        return load_pretrained(str(path), dtype=self.recipe.model.dtype).to(self.accelerator.device)

    def _load_teacher(self, source: str) -> torch.nn.Module:
        from olm_cli.modeling import load_pretrained

        teacher = load_pretrained(source, dtype=self.recipe.model.dtype, trust_remote_code=self.recipe.distill.trust_remote_code)
        return teacher.to(self.accelerator.device)

    def _seed_replay(self) -> None:
        from olm_cli.replay import seed_buffer

        cap = self.recipe.replay.seed_samples
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
            self.replay.add(chunk, 0, logits=[topk_logits(logits[j, : len(b)].float(), k) for j, b in enumerate(chunk)])
        model.train(was_training)

    # ------------------------------------------------------------------ the loop

    def train(self) -> TrainOutcome:
        recipe = self.recipe
        accelerator = self.accelerator
        model = self.model
        self.loop_started = time.monotonic()
        first_step = self.step
        # Rate and ETA count only what this invocation trains (a resume starts mid-increment).
        self.loop_first = (self.step, self.tokens)
        stopping = contextlib.nullcontext(self.stop) if self.stop is not None else GracefulStop()
        with stopping as stop, self._progress() as progress:
            task = progress.add_task(f"increment {self.increment}", total=self.horizon, completed=self.step) if progress else None
            while not self._increment_done():
                if stop.requested and self.step == first_step:
                    # Nothing trained in this invocation: nothing to save.
                    where = f"continues from {self.latest.name}" if self.resuming and self.latest else "starts this increment again"
                    return TrainOutcome("interrupted", stop.exit_code, self.increment, self.step, self.tokens, None,
                                        f"stopped by signal {stop.signal} before the first step; the next run {where}")
                if stop.requested:
                    path = self._checkpoint(complete=False)
                    return TrainOutcome("interrupted", stop.exit_code, self.increment, self.step, self.tokens, str(path),
                                        f"stopped by signal {stop.signal}; checkpoint written, the next run continues")
                # At least one step per invocation, so a budget shorter than start-up still progresses.
                over_budget = recipe.run.time_budget is not None and time.monotonic() - self.started >= recipe.run.time_budget
                if over_budget and self.step > first_step:
                    path = self._checkpoint(complete=False)
                    return TrainOutcome("time_budget", EXIT_OK, self.increment, self.step, self.tokens, str(path),
                                        "time budget reached; checkpoint written, the next run continues")
                t0 = time.perf_counter()

                # select: a candidate pool of new blocks, scored by the selector.
                plan = self.policy.plan()
                n_replay = self._replay_share(plan.samples)
                n_new = plan.samples - n_replay
                # A whole replay step (possible when the batch is small) takes no new data.
                pool = self.stream.take(n_new * self.selector.pool_factor) if n_new else []
                if not pool and n_new:
                    break
                selection = (self.selector.select(accelerator.unwrap_model(model), pool, min(n_new, len(pool)), self.pad_id)
                             if pool else Selection([], None, None, 0))
                self.unselected += selection.unselected
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
                result = self._forward_backward(samples, weights, stored, plan.micro_batch, n_new=len(new_blocks))
                if result is None:
                    continue
                loss, per_sample, new_logits = result

                # step: a non-finite gradient never reaches the weights (as GradScaler and Megatron do).
                grad_norm = self._clip()
                if not math.isfinite(grad_norm):
                    self._skip_batch(f"non-finite gradient norm ({grad_norm})", loss=loss, grad_norm=grad_norm)
                    continue
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.bad_steps = 0
                self.step += 1
                self.global_step += 1
                self._set_lr()

                # bookkeeping, observe, log.
                seconds = time.perf_counter() - t0
                step_tokens = self._bookkeep(new_blocks, replayed, selection, per_sample, new_logits)
                self.policy.observe(StepStats(loss=loss, grad_norm=grad_norm, samples=len(samples), tokens=step_tokens,
                                              seconds=seconds, pool_mean_entropy=selection.stats.get("pool_mean_entropy")))
                self._log_step(loss, grad_norm, step_tokens, seconds, new_blocks, replayed, selection, progress, task)

                # checkpoint.
                if self.step % recipe.run.checkpoint_every == 0 and not self._increment_done():
                    self._checkpoint(complete=False)

        return self._finish_increment()

    def _bookkeep(self, new_blocks: list[Block], replayed: list[Any], selection: Any, per_sample: np.ndarray,
                  new_logits: list[tuple[np.ndarray, np.ndarray]] | None) -> int:
        """Replay insertion and re-scoring (this step's losses, no second forward), ledger counts."""
        step_tokens = sum(len(b) for b in new_blocks) + sum(len(r.tokens) for r in replayed)
        self.tokens += step_tokens
        self.total_tokens += step_tokens
        n = len(new_blocks)
        scores = selection.scores[selection.indices] if selection.scores is not None else per_sample[:n]
        self.replay.add(new_blocks, self.global_step, scores=[float(s) for s in scores], logits=new_logits)
        if replayed:
            self.replay.update_scores([r.id for r in replayed], [float(s) for s in per_sample[n:]])
        for block in new_blocks:
            self.domain_tokens[block.domain] += len(block)
            if block.shard in self.ledger:
                self.ledger.add_tokens(block.shard, len(block))
        self._mark_finished_shards()
        return step_tokens

    def _log_step(self, loss: float, grad_norm: float, step_tokens: int, seconds: float, new_blocks: list[Block],
                  replayed: list[Any], selection: Any, progress: Any, task: Any) -> None:
        lr = self.optimizer.param_groups[0]["lr"]
        rate = step_tokens / max(seconds, 1e-9)
        if self.step % self.recipe.run.log_every == 0:
            domains = Counter(b.domain for b in new_blocks)
            self._log({
                "step": self.global_step, "increment": self.increment, "increment_step": self.step,
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.total_tokens, "tokens_per_s": rate,
                "domain": domains.most_common(1)[0][0] if domains else None,
                "batch_size": len(new_blocks) + len(replayed), "micro_batch": self.micro_batch_used,
                "replayed": len(replayed), "unselected": self.unselected,
                **{k: float(v) for k, v in selection.stats.items()}, "time": time.time(),
                "cpu_time": time.process_time(),
            })
        if progress is not None:
            progress.update(task, completed=self.step,
                            description=f"increment {self.increment} loss {loss:.3f} lr {lr:.2e} {rate:,.0f} tok/s")
        elif self.step % max(1, self.horizon // 10) == 0 or self.step == 1:
            self._report_plain(loss, lr)

    def _mark_finished_shards(self) -> None:
        for shard in self.stream.take_finished_shards():
            if shard in self.ledger:
                self.ledger.mark_done(shard, 0, self.increment, long_documents=self.stream.long_document_counts(shard))

    def _report_plain(self, loss: float, lr: float) -> None:
        """Progress for logs (cron, systemd): a line every tenth of the increment."""
        elapsed = time.monotonic() - self.loop_started
        first_step, first_tokens = self.loop_first
        rate = (self.tokens - first_tokens) / max(elapsed, 1e-9)
        done = self.step - first_step
        eta = elapsed / done * max(0, self.horizon - self.step) if done else 0.0
        self._say(f"increment {self.increment} step {self.step}/{self.horizon} loss {loss:.4f} lr {lr:.2e} "
                  f"{rate:,.0f} tok/s ETA {eta:,.0f}s")

    def _increment_done(self) -> bool:
        run = self.recipe.run
        if run.max_tokens is not None and self.tokens >= run.max_tokens:
            return True
        # Only max_steps ends an increment by step count. A token budget, or one pass over the
        # new shards, uses its step estimate for the schedule alone (past it the learning rate
        # stays at its floor), so no leftover blocks are carried into an otherwise empty night.
        if run.max_steps is not None and self.step >= run.max_steps:
            return True
        return self.stream.exhausted

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

    def _stored_logits(self, new_blocks: list[Block], replayed: list[Any]) -> list[tuple[np.ndarray, np.ndarray] | None] | None:
        """Per-sample stored top-k logits (None for fresh samples), for DER-style distillation."""
        if self.distiller is None or self.recipe.distill.method != "stored_logits" or not replayed:
            return None
        entries: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(new_blocks)
        for item in replayed:
            has = item.logits_values is not None and item.logits_indices is not None
            entries.append((item.logits_values, item.logits_indices) if has else None)
        return entries

    def _forward_backward(self, samples: list[np.ndarray], weights: np.ndarray, stored: Any, micro_batch: int,
                          n_new: int) -> tuple[float, np.ndarray, list[tuple[np.ndarray, np.ndarray]] | None] | None:
        """Accumulate gradients over micro-batches; None when the batch was skipped (NaN/Inf)."""
        accelerator = self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        # Every rank holds the same batch (same stream, selector and replay state); each computes
        # the gradient of its slice and DDP averages them.
        mine = list(range(rank, len(samples), world)) or [0]
        norm = float(sum(weights[i] for i in mine))
        keep_topk = self.recipe.replay.store_logits_topk > 0  # 0 with replay.policy none
        while True:
            try:
                total, per_sample = 0.0, np.zeros(len(samples))
                new_logits: list[tuple[np.ndarray, np.ndarray]] = []
                chunks = [mine[i : i + micro_batch] for i in range(0, len(mine), micro_batch)]
                for c, chunk in enumerate(chunks):
                    batch = {k: v.to(accelerator.device) for k, v in collate([samples[i] for i in chunk], self.pad_id).items()}
                    sync = accelerator.no_sync(self.model) if c < len(chunks) - 1 else contextlib.nullcontext()
                    with sync, accelerator.autocast():
                        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                        row_loss, _ = per_sample_loss(logits, batch["labels"])
                        w = torch.as_tensor(weights[chunk], dtype=row_loss.dtype, device=row_loss.device)
                        ce = (row_loss * w).sum() / norm
                        loss = ce
                        if self.kd_active:
                            chunk_stored = None
                            if stored is not None:
                                width = batch["input_ids"].shape[1]
                                chunk_stored = tuple(t.to(accelerator.device) for t in collate_stored([stored[i] for i in chunk], width))
                            kd = self.distiller.loss(logits, batch, chunk_stored)
                            if kd is not None:
                                alpha = self.recipe.distill.alpha
                                loss = alpha * ce + (1 - alpha) * kd * (len(chunk) / len(mine))
                        if self.regularizer is not None:
                            loss = loss + self.regularizer.penalty(accelerator.unwrap_model(self.model)) * (len(chunk) / len(mine))
                    if not torch.isfinite(loss):
                        value = float(loss.detach())
                        return self._skip_batch(f"non-finite loss ({value})", loss=value)
                    accelerator.backward(loss)
                    total += float(loss.detach())
                    per_sample[chunk] = row_loss.detach().float().cpu().numpy()
                    if keep_topk:
                        for row, index in enumerate(chunk):
                            if index < n_new:
                                n = len(samples[index])
                                new_logits.append(topk_logits(logits[row, :n].detach().float(), self.recipe.replay.store_logits_topk))
                self.micro_batch_used = micro_batch
                return total, per_sample, (new_logits if keep_topk else None)
            except torch.OutOfMemoryError:
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if not self.policy.on_oom():
                    raise OlmError("out of memory even with micro-batch 1; use a smaller model, block_size or dtype") from None
                micro_batch = self.policy.plan().micro_batch
                self._say(f"[yellow]out of memory:[/] retrying the same batch with micro-batch {micro_batch}")

    def _skip_batch(self, what: str, *, loss: float, grad_norm: float | None = None) -> None:
        """Drop this batch's gradients without stepping; stop after ``run.max_bad_steps`` in a row.

        The skipped step is logged (strict JSON, the non-finite values as null) so a run's metrics
        show every batch that did not reach the weights.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.bad_steps += 1
        self.skipped_steps += 1
        limit = self.recipe.run.max_bad_steps
        self._say(f"[yellow]warning:[/] {what} at step {self.global_step + 1}; batch skipped ({self.bad_steps}/{limit})")
        self._log({"step": self.global_step + 1, "increment": self.increment, "increment_step": self.step + 1,
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
        where = (f"rolled back to {self.latest.name} (verified finite)" if self.latest is not None
                 else "no checkpoint was written")
        diverged_here = (self.latest is not None and self.latest in self.saved_here
                         and step_of(self.latest) == self.global_step)
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

    def _clip(self) -> float:
        clip = self.recipe.optim.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        norm = self.accelerator.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        return float(norm)

    def _set_lr(self) -> None:
        o = self.recipe.optim
        mult = lr_multiplier(self.step, warmup=o.warmup_steps, horizon=self.horizon, schedule=o.schedule, min_ratio=o.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = o.lr * mult

    # ------------------------------------------------------------------ checkpoint / finish

    def _finish_increment(self) -> TrainOutcome:
        self.stream.at_end()  # close a shard whose last block was the last one trained
        self._mark_finished_shards()
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.regularizer is not None:
            self.regularizer.end_increment(unwrapped, self._fisher_batches())
        path = self._checkpoint(complete=True)
        self._say(f"increment {self.increment} complete: {self.step} steps, {self.tokens:,} tokens → {path}")
        released = True
        message = ""
        if self.accelerator.is_main_process:
            # The checkpoint is training state; what serving reads is the release, behind the gate.
            result = evaluate_and_release(self.recipe, unwrapped, self.tokenizer, increment=self.increment,
                                          step=self.global_step, checkpoint=path, trained=dict(self.domain_tokens),
                                          tokens_trained=self.total_tokens, state_dict=self.full_state_dict,
                                          console=self.console)
            if result is not None:
                released, message = result.released, result.message
        released, message = _from_main_process(self.accelerator, (released, message))
        self.accelerator.end_training()
        self.replay.close()
        if not released:
            return TrainOutcome("not_released", EXIT_NOT_RELEASED, self.increment, self.step, self.tokens, str(path),
                                message)
        return TrainOutcome("increment_complete", EXIT_OK, self.increment, self.step, self.tokens, str(path))

    def _fisher_batches(self) -> list[dict[str, torch.Tensor]]:
        """Batches for the EWC Fisher: replay samples if there are any, else recent eval data."""
        n = self.recipe.regularize.fisher_batches
        size = self.recipe.batch.micro_batch
        tokens: list[np.ndarray] = []
        if len(self.replay):
            state = np.random.get_state()
            tokens = [item.tokens for item in self.replay.sample(min(len(self.replay), n * size))]
            np.random.set_state(state)
        if not tokens:
            # The increment's own data, read with the recipe's data settings (also a streamed dataset).
            tokens = [b.tokens for b in self._make_stream().take(n * size)]
        device = self.accelerator.device
        return [{k: v.to(device) for k, v in collate(tokens[i : i + size], self.pad_id).items()}
                for i in range(0, min(len(tokens), n * size), size)]

    def _checkpoint(self, *, complete: bool) -> Path:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if self.bad_steps:
            # The last batches were all skipped (the data ran out, a signal or the time budget
            # came mid-streak): the weights that produced them must not become the rollback target.
            raise self._diverged()
        self._require_finite_weights()
        path = self.checkpoints.root / f"step-{self.global_step:08d}"
        # FSDP/DeepSpeed shard the weights: every rank takes part in gathering the full state dict.
        sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
        self.full_state_dict = accelerator.get_state_dict(self.model) if sharded else None
        if accelerator.is_main_process:
            self.state_to_save = self._trainer_state(complete=complete)
            path = self.checkpoints.save(self.global_step, self._write_checkpoint,
                                         metadata={"increment": self.increment, "complete": complete, "finite": True})
            self.latest = path
            self.saved_here.add(path)
            self.ledger.save()
        accelerator.wait_for_everyone()
        return path

    def _require_finite_weights(self) -> None:
        """Refuse to checkpoint NaN/Inf weights: every checkpoint (and so every rollback) is finite."""
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if not bad:
            return
        where = (f"latest stays {self.latest.name} (verified finite)" if self.latest is not None
                 else "no checkpoint was written")
        raise TrainingDivergedError(
            f"{len(bad)} parameter tensor(s) became NaN/Inf by step {self.global_step} (first: {bad[0]}); "
            f"not checkpointed, {where}. Lower optim.lr or check the data"
        )

    def _trainer_state(self, *, complete: bool) -> dict[str, Any]:
        return {
            "increment": self.increment,
            "increment_complete": complete,
            "step": self.step,
            "horizon": self.horizon,
            "global_step": self.global_step,
            "tokens": self.tokens,
            "total_tokens": self.total_tokens,
            "unselected": self.unselected,
            "domain_tokens": dict(self.domain_tokens),
            "stream": self.stream.state_dict(),
            "ledger": self.ledger.state_dict(),
            "shard_plan": [str(p) for p in self.shard_plan],
            "host": socket.gethostname(),
            "saved_at": time.time(),
        }

    def _write_checkpoint(self, directory: Path) -> None:
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.full_state_dict is not None:
            unwrapped.save_pretrained(directory, state_dict=self.full_state_dict, safe_serialization=True)
        else:
            self.partial.for_save(unwrapped).save_pretrained(directory, safe_serialization=True)
        save_tokenizer(self.tokenizer, directory)  # after the model: it reads config.json for the length
        with open(directory / "optimizer.pt", "wb") as handle:  # a plain OSError on a full disk
            torch.save(self.optimizer.state_dict(), handle)
        save_tree(directory / "rng", _rng_to_tree(capture_rng()))
        save_tree(directory / "parts", {
            "selector": self.selector.state_dict(),
            "batch": self.policy.state_dict(),
            "distiller": self.distiller.state_dict() if self.distiller is not None else {},
            "partial": self.partial.state_dict(),
        })
        self.replay.save(directory / "replay")  # NoReplay writes nothing
        if self.regularizer is not None:
            self.regularizer.save(directory / "regularizer")
        (directory / TRAINER_STATE).write_text(json.dumps(self.state_to_save, indent=1))

    def _load_parts(self, checkpoint: Path) -> None:
        """Optimizer and strategy state; a file that cannot be read raises CheckpointLoadError.

        OlmErrors raised on purpose (a replay snapshot written under another policy) are about
        the recipe, not the files: no older checkpoint would fix them, so they propagate.
        """
        with loading_checkpoint(checkpoint, "optimizer.pt"):
            state = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
        try:
            self.optimizer.load_state_dict(state)
        except (ValueError, KeyError) as exc:
            # Trainable parameters changed (e.g. a new `train.trainable`): start fresh moments.
            logger.warning("optimizer state not restored (%s); starting with fresh AdamW moments", exc)
        with loading_checkpoint(checkpoint, "the strategy state", keep=(OlmError,)):
            parts = load_tree(checkpoint / "parts")
            self.selector.load_state_dict(parts.get("selector", {}))
            self.policy.load_state_dict(parts.get("batch", {}))
            if self.distiller is not None and parts.get("distiller"):
                self.distiller.load_state_dict(parts["distiller"])
            self.partial.load_state_dict(parts.get("partial", {}))
        with loading_checkpoint(checkpoint, "the replay buffer", keep=(OlmError,)):
            if (checkpoint / "replay").exists():
                self.replay.load(checkpoint / "replay")
        with loading_checkpoint(checkpoint, "the regularizer state", keep=(OlmError,)):
            if self.regularizer is not None and (checkpoint / "regularizer").exists():
                self.regularizer.load(checkpoint / "regularizer")

    # ------------------------------------------------------------------ output

    def _log(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        row = strict_json_row(row)
        with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        if self.recipe.run.tensorboard:
            self.accelerator.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=row["step"])

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


def evaluate_and_release(recipe: Recipe, model: torch.nn.Module, tokenizer: Any, *, increment: int, step: int,
                         checkpoint: Path, trained: dict[str, int], tokens_trained: int,
                         state_dict: Any = None, console: Any = None) -> Any:
    """Evaluate every domain (a row of the matrix), then publish the increment's release behind the gate.

    Returns the :class:`~olm_cli.release.ReleaseResult`, or None when releases are off. Also used
    when a run died between an increment's checkpoint and its release (see
    :func:`publish_pending_release`), so both paths publish exactly the same way.
    """
    from olm_cli.evaluation.domains import record_increment_eval
    from olm_cli.release import publish_release

    run_dir = Path(recipe.run.dir)
    results = None
    if recipe.eval.after_increment and recipe.eval.sets:
        if console is not None:
            console.print(f"evaluating {len(recipe.eval.sets)} domain(s) after increment {increment}")
        results = record_increment_eval(run_dir, recipe, model, tokenizer, increment=increment, trained=trained,
                                        step=step, console=console)
    if not recipe.release.enabled:
        return None
    result = publish_release(run_dir, recipe, model, tokenizer, increment=increment, step=step, checkpoint=checkpoint,
                             eval_results=results, tokens_trained=tokens_trained, state_dict=state_dict)
    # A refusal is the caller's last line (and exit code 3); a release is reported here.
    if console is not None and result.released:
        console.print(result.message, highlight=False)
    return result


def publish_pending_release(recipe: Recipe, checkpoint: Path, state: dict[str, Any], console: Any = None) -> Any:
    """Finish an increment whose checkpoint is complete but whose release was never attempted.

    A crash (or a full disk) between the final checkpoint and the release would otherwise leave
    serving on the previous release for good: the next run finds nothing new and exits 0.
    """
    from olm_cli.modeling import load_pretrained, load_tokenizer

    if console is not None:
        console.print(f"increment {state['increment']} was checkpointed ({checkpoint.name}) but not released; "
                      "evaluating and releasing it now")
    with loading_checkpoint(checkpoint, "the model or tokenizer"):
        model = load_pretrained(str(checkpoint), dtype=recipe.model.dtype)
        tokenizer = load_tokenizer(str(checkpoint))
    if torch.cuda.is_available():
        model = model.to("cuda")
    return evaluate_and_release(recipe, model, tokenizer, increment=int(state["increment"]),
                                step=int(state["global_step"]), checkpoint=checkpoint,
                                trained=dict(state.get("domain_tokens", {})),
                                tokens_trained=int(state.get("total_tokens", 0)), console=console)


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


def _rebase_stream_state(state: dict[str, Any], plan: list[Path]) -> dict[str, Any]:
    """Continue a previous increment's data position with a longer shard plan."""
    rebased = dict(state)
    rebased["shards"] = [str(p) for p in plan]
    rebased["shard_index"] = 0
    return rebased
