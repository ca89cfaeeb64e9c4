"""The cooldown branch of ``optim.schedule: wsd``: what an increment releases, off the trunk.

Under WSD the trunk trains at a constant rate through every increment and is never cooled. At
the end of an increment, once the trunk's final checkpoint is written, this branch copies the
trunk onward for ``optim.cooldown_fraction`` of the increment's steps while the rate falls to
``lr * min_lr_ratio`` (:func:`olm_cli.schedule.cooldown_multiplier`). Its data is the
increment's own shards read again from their start, mixed with replay at ``replay.ratio``; the
objective is the task cross-entropy (distillation and penalties shape the trunk only). The
cooled weights are what the increment evaluates and releases; the next increment starts from
the trunk's checkpoint, so no cooled model is ever re-warmed.

Every ``run.checkpoint_every`` branch steps (and on a stop signal or the time budget) the branch
writes ``RUN/cooldown/step-NNNNNNNN``: weights, AdamW moments, RNG, its data position and the
replay buffer as the branch has drawn from it, plus ``cooldown_state.json`` naming the trunk
checkpoint it grew from. A run killed mid-cooldown finds the trunk's increment complete but not
released, sets up from that trunk checkpoint, continues the branch from its checkpoint and ends
with bit-identical cooled weights. A branch checkpoint of another increment or trunk is stale
and removed. The folder is removed once the release is written.

Every ``run.log_every`` branch steps (and its last) a line goes to ``metrics.jsonl`` tagged
``"phase": "cooldown"``, with ``step`` the trunk step it branched at and ``cooldown_step`` its
own, so the trunk's series stays as it was and ``olm status`` / ``olm report`` can show the
branch. Lines a killed branch wrote after its checkpoint are dropped when it resumes.

Under ``run.distributed: fsdp`` the branch trains the sharded model with the sharded optimiser
(each rank its shard, as the trunk); its checkpoint holds the weights gathered (rank 0 writes
them) and AdamW's moments sharded (``optimizer-sharded/``, every rank its part), and the
release gets the gathered weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from olm_cli.distributed.agreement import agree_to_stop
from olm_cli.distributed.sharded_checkpoint import restore_optimizer, save_sharded_optimizer
from olm_cli.distributed.sharding import full_state_dict, gradient_sync
from olm_cli.errors import OlmError, TrainingDivergedError
from olm_cli.host_sync import AccumulatedBatch, fetch_step, to_device
from olm_cli.rng import capture_rng, restore_rng, seed_everything
from olm_cli.rundir import CheckpointManager
from olm_cli.rundir.atomic import append_line_durable, write_json_atomic, write_text_atomic
from olm_cli.rundir.checkpoint import CheckpointVerifyError, loading_checkpoint
from olm_cli.rundir.optimizer_state import load_optimizer_state, save_optimizer_state
from olm_cli.samples import collate
from olm_cli.schedule import cooldown_multiplier, cooldown_steps
from olm_cli.state_files import load_tree, save_tree

COOLDOWN_DIR = "cooldown"
"""``RUN/cooldown/``: the checkpoints of the branch being trained (at most one kept)."""
HISTORY_FILE = "cooldown-history.jsonl"
"""``RUN/cooldown-history.jsonl``: one line per finished cooldown (steps, tokens, seconds, losses)."""
STATE_FILE = "cooldown_state.json"
PHASE = "cooldown"
"""The ``phase`` of the branch's lines in ``metrics.jsonl`` (the trunk's carry no phase)."""
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class CooldownState:
    """Where a branch stands; saved with each of its checkpoints."""

    increment: int
    trunk: str  # the trunk checkpoint's directory name the branch grew from
    steps: int  # the branch's length
    step: int = 0  # branch steps done
    tokens: int = 0  # tokens trained by the branch (new + replay)
    seconds: float = 0.0  # time spent training the branch, over every invocation
    first_loss: float | None = None
    last_loss: float | None = None


class CooldownBranch:
    """Trains one increment's cooldown off the trunk, in the trainer's model, optimiser and replay buffer.

    ``trainer`` is the :class:`~olm_cli.engine.Trainer` whose trunk checkpoint ``trunk`` was
    just written (or, for a pending release, loaded): the branch reuses its accelerator, model,
    optimiser, replay buffer, stream factory and forward, and leaves its trunk state untouched.
    """

    def __init__(self, trainer: Any, trunk: Path) -> None:
        self.trainer = trainer
        self.recipe = trainer.recipe
        self.trunk = Path(trunk)
        self.root = Path(self.recipe.run.dir) / COOLDOWN_DIR
        self.checkpoints = CheckpointManager(self.root, keep=1)
        increment = trainer.state.increment
        self.state = CooldownState(increment=increment, trunk=self.trunk.name,
                                   steps=cooldown_steps(trainer.state.step, self.recipe.optim.cooldown_fraction))

    # ------------------------------------------------------------------ the loop

    def run(self, stop: Any = None) -> bool:
        """Train the branch to its end (True), or checkpoint it and return False on a stop or the time budget."""
        trainer, recipe = self.trainer, self.recipe
        accelerator = trainer.accelerator
        # The plan every rank holds (the trainer state records it on rank 0 only, as it checkpoints).
        stream = trainer._make_stream(list(trainer.shard_plan))
        resumed = self._resume(stream)
        if not resumed:
            seed_everything(recipe.run.seed + self.state.increment)
        self._drop_unsaved_rows()
        state = self.state
        trainer._say(f"cooldown of increment {state.increment}: "
                     + (f"resuming at step {state.step}/{state.steps}" if resumed else f"{state.steps} step(s)")
                     + f", {recipe.optim.cooldown_shape} decay to lr x {recipe.optim.min_lr_ratio}, "
                     f"from trunk {self.trunk.name}")
        trainer.model.train()
        bad_steps = 0
        first = state.step
        while state.step < state.steps:
            over_budget = (recipe.run.time_budget is not None
                           and time.monotonic() - trainer.started >= recipe.run.time_budget and state.step > first)
            stopped, over_budget = agree_to_stop(stop, over_budget=over_budget)  # every rank leaves at the same step
            if stopped or over_budget:
                self._checkpoint(stream)
                return False
            t0 = time.perf_counter()
            size = recipe.batch.size
            n_replay = trainer._replay_share(size)
            new = stream.take(size - n_replay)
            replayed = trainer.replay.sample(n_replay) if n_replay else []
            if not new and not replayed:
                trainer._say(f"[yellow]warning:[/] the increment's data ran out after {state.step} of "
                             f"{state.steps} cooldown steps; the branch ends there")
                break
            samples = [b.tokens for b in new] + [r.tokens for r in replayed]
            weights = np.concatenate([np.ones(len(new)), [r.weight for r in replayed]])
            multiplier = cooldown_multiplier(state.step, state.steps, shape=recipe.optim.cooldown_shape,
                                             min_ratio=recipe.optim.min_lr_ratio)
            for group in trainer.optimizer.param_groups:
                group["lr"] = recipe.optim.lr * multiplier
            measured = fetch_step(self._forward_backward(samples, weights), trainer._clip())
            if measured.bad_loss is not None or not math.isfinite(measured.grad_norm):
                trainer.optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                trainer._say(f"[yellow]warning:[/] non-finite loss or gradient at cooldown step {state.step + 1}; "
                             f"batch skipped ({bad_steps}/{recipe.run.max_bad_steps})")
                if bad_steps >= recipe.run.max_bad_steps:
                    raise TrainingDivergedError(f"the cooldown of increment {state.increment} diverged "
                                                f"({bad_steps} non-finite steps in a row); the trunk "
                                                f"{self.trunk.name} is intact. Lower optim.lr")
                continue
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            bad_steps = 0
            state.step += 1
            state.tokens += sum(len(s) for s in samples)
            state.seconds += time.perf_counter() - t0
            state.first_loss = measured.loss if state.first_loss is None else state.first_loss
            state.last_loss = measured.loss
            if state.step % recipe.run.log_every == 0 or state.step == state.steps:
                self._log(measured.loss, recipe.optim.lr * multiplier, measured.grad_norm, len(samples),
                          len(replayed), sum(len(s) for s in samples) / max(time.perf_counter() - t0, 1e-9))
            if state.step == 1 or state.step % max(1, state.steps // 10) == 0 or state.step == state.steps:
                trainer._say(f"cooldown {state.step}/{state.steps} loss {measured.loss:.4f} "
                             f"lr {recipe.optim.lr * multiplier:.2e}")
            if state.step % recipe.run.checkpoint_every == 0 and state.step < state.steps:
                self._checkpoint(stream)
        accelerator.wait_for_everyone()
        return True

    def _forward_backward(self, samples: list[np.ndarray], weights: np.ndarray) -> AccumulatedBatch:
        """The branch's cross-entropy over micro-batches of the recipe's size (the same on every resume)."""
        trainer = self.trainer
        accelerator = trainer.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        # As the trunk's step: each slice is divided by the whole batch's weight over the world size,
        # so an uneven split trains the batch mean one process would.
        mine = list(range(rank, len(samples), world))
        norm = float(sum(weights)) / world
        if not mine:  # fewer samples than ranks: this rank's backward takes part in the reduction, adding nothing
            mine, weights = [0], np.zeros_like(weights)
        size = self.recipe.batch.micro_batch
        accumulated = AccumulatedBatch(samples=len(samples), rows=mine)
        chunks = [mine[i : i + size] for i in range(0, len(mine), size)]
        for c, chunk in enumerate(chunks):
            host = collate([samples[i] for i in chunk], trainer.pad_id)
            host["weights"] = torch.as_tensor(weights[chunk], dtype=torch.float32)
            batch = to_device(host, accelerator.device)
            sample_weights = batch.pop("weights")
            last = c == len(chunks) - 1
            sync = (gradient_sync(trainer.model, last) if trainer.distributed.sharded
                    else contextlib.nullcontext() if last else accelerator.no_sync(trainer.model))
            with sync, accelerator.autocast():
                row_loss, _ = trainer._row_losses(batch)
                loss = (row_loss * sample_weights).sum() / norm
            accelerator.backward(loss)
            accumulated.add(loss, row_loss)
        return accumulated

    # ------------------------------------------------------------------ metrics

    def _log(self, loss: float, lr: float, grad_norm: float, samples: int, replayed: int, rate: float) -> None:
        """One ``metrics.jsonl`` line for this branch step (not sent to the trackers: its step is the trunk's)."""
        if not self.trainer.accelerator.is_main_process:
            return
        from olm_cli.engine import strict_json_row

        state = self.state
        row = strict_json_row({
            "step": self.trainer.state.global_step, "increment": state.increment, "phase": PHASE,
            "cooldown_step": state.step, "cooldown_steps": state.steps, "trunk": state.trunk, "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "cooldown_tokens": state.tokens, "tokens_per_s": rate, "batch_size": samples,
            "replayed": replayed, "time": time.time(),
        })
        with open(Path(self.recipe.run.dir) / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")

    def _drop_unsaved_rows(self) -> None:
        """Remove this increment's branch lines past the step the branch (re)starts from (a killed run's)."""
        path = Path(self.recipe.run.dir) / "metrics.jsonl"
        if not self.trainer.accelerator.is_main_process or not path.exists():
            return
        lines = path.read_text(encoding="utf-8").splitlines()
        kept = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if not (isinstance(row, dict) and row.get("phase") == PHASE and row.get("increment") == self.state.increment
                    and int(row.get("cooldown_step") or 0) > self.state.step):
                kept.append(line)
        if len(kept) != len(lines):
            write_text_atomic(path, "".join(line + "\n" for line in kept))

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint(self, stream: Any) -> None:
        """Write the branch's state as ``RUN/cooldown/step-NNNNNNNN`` (rank 0; under FSDP every rank adds
        its optimiser shard, and the weights are gathered to rank 0 first)."""
        trainer = self.trainer
        accelerator = trainer.accelerator
        sharded = trainer.distributed.sharded
        accelerator.wait_for_everyone()
        gathered = full_state_dict(trainer.model) if sharded else None  # a collective
        step = self.state.step
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(trainer.model)
            position = stream.state_dict()
            rng = capture_rng()
            optimizer = None if sharded else trainer.optimizer.state_dict()
            state = asdict(self.state)

            def write(directory: Path) -> None:
                if gathered is not None:
                    save_file(_unshared(gathered), str(directory / WEIGHTS_FILE))
                else:
                    save_model(unwrapped, str(directory / WEIGHTS_FILE))  # tied weights stored once
                if optimizer is not None:
                    save_optimizer_state(directory, optimizer)
                save_tree(directory / "rng", rng)
                save_tree(directory / "stream", {"position": position})
                trainer.replay.save(directory / "replay")  # the buffer's draw counters and generator
                write_json_atomic(directory / STATE_FILE, state)

            if sharded:
                self.checkpoints.stage(step, lambda directory: None)
        if sharded:
            # Every rank writes its shard of AdamW's moments into the staged directory (a collective).
            save_sharded_optimizer(self.checkpoints.staged_path(step), trainer.model, trainer.optimizer)
        if accelerator.is_main_process:
            self.checkpoints.save(step, write, metadata={"increment": self.state.increment, "trunk": self.trunk.name},
                                  staged=sharded)
        accelerator.wait_for_everyone()

    def _resume(self, stream: Any) -> bool:
        """Continue from the branch's checkpoint when it grew from this very trunk; drop a stale one."""
        if not self.root.exists():
            return False
        path = None
        with contextlib.suppress(CheckpointVerifyError):
            path = self.checkpoints.latest(deep=True)
        saved: dict[str, Any] = {}
        if path is not None:
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        same = (path is not None and saved.get("increment") == self.state.increment
                and saved.get("trunk") == self.state.trunk and saved.get("steps") == self.state.steps)
        trainer = self.trainer
        trainer.accelerator.wait_for_everyone()  # every rank has decided before rank 0 removes anything
        if not same:
            self.discard()
            return False
        assert path is not None
        with loading_checkpoint(path, "the cooldown branch"):
            if trainer.distributed.sharded:
                load_sharded_weights(trainer.model, load_file(str(path / WEIGHTS_FILE)))
            else:
                load_model(trainer.accelerator.unwrap_model(trainer.model), str(path / WEIGHTS_FILE))
            if not restore_optimizer(path, trainer.model, trainer.optimizer, sharded=trainer.distributed.sharded):
                trainer.optimizer.load_state_dict(load_optimizer_state(path))
            restore_rng(load_tree(path / "rng"))
            stream.load_state_dict(load_tree(path / "stream")["position"])
            trainer.replay.load(path / "replay")
        self.state = CooldownState(**saved)
        return True

    def discard(self) -> None:
        """Remove the branch's checkpoints (after its release, or when they belong to another trunk)."""
        if self.trainer.accelerator.is_main_process:
            shutil.rmtree(self.root, ignore_errors=True)

    def record(self) -> dict[str, Any]:
        """Append the finished branch's cost and losses to ``RUN/cooldown-history.jsonl``; return the row."""
        row = asdict(self.state)
        if self.trainer.accelerator.is_main_process:
            append_line_durable(Path(self.recipe.run.dir) / HISTORY_FILE, json.dumps(row))
        return row


def require_unsharded(accelerator: Any) -> None:
    """The branch under Accelerate's own FSDP or DeepSpeed (olm shards with its FSDP2 path, which the
    branch supports): a clear error, not a wrong file."""
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        raise OlmError("optim.schedule 'wsd' trains its cooldown with olm's own sharding only; it does not run under "
                       "DeepSpeed (use run.distributed fsdp or ddp)")


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gathered weights as safetensors takes them: a tensor stored under two names (tied) is copied."""
    seen: set[int] = set()
    out = {}
    for name, tensor in weights.items():
        pointer = tensor.data_ptr()
        out[name] = tensor.clone() if pointer in seen else tensor
        seen.add(pointer)
    return out


def load_sharded_weights(model: torch.nn.Module, weights: dict[str, Any]) -> None:
    """Whole weights (read by every rank) into an FSDP2 model: each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    # strict=False: a tied output layer saved once follows its embedding.
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
