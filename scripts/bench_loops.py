"""The three training loops that the throughput benchmarks compare, timed the same way.

Shared by ``scripts/bench_throughput.py`` (CPU) and ``scripts/bench_gpu.py`` (one GPU), so both
measure the contenders alike. Each contender trains the same model (identical initial weights),
the same number of samples of the same length per optimiser step, with AdamW at the same
settings, for ``steps`` steps, in this process:

* **olm** -- the real engine through ``run_increment`` (what ``olm train`` runs), reading,
  tokenising and packing the shards itself, with every part its recipe names;
* **bare** -- a hand-written PyTorch loop over batches collated before the clock starts:
  ``model(**batch).loss``, backward, clip, ``optimizer.step()``, ``zero_grad`` -- the floor
  that any training loop pays for the same model and data;
* **hf_trainer** -- ``transformers.Trainer`` over a ``datasets.Dataset`` of the same blocks.

The timed window is the same for all three: from the end of optimiser step ``warmup`` to the end
of step ``steps``, so start-up, the first steps (allocator, kernel choice) and olm's final
checkpoint are outside it. Each contender reports wall time (``time.perf_counter``; on CUDA
after a synchronize, so a stamp marks finished work) and process CPU time
(``time.process_time``: every thread of this process, but not child processes). olm is timed
from its own ``metrics.jsonl`` (``time`` and ``cpu_time`` of each step's line), which it writes
after the step's host transfer of the loss.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from olm_cli.samples import collate  # noqa: E402

CONTENDERS = ("olm", "bare", "hf_trainer")


@dataclass(frozen=True)
class Window:
    """What one contender trained inside its timed window, and what that cost."""

    tokens: int
    wall_s: float
    cpu_s: float | None  # None when olm's metrics carry no cpu_time
    peak_memory_bytes: int | None = None  # CUDA only
    notes: tuple[str, ...] = ()  # what makes this figure not like the others (e.g. olm backed off its micro-batch)

    def tokens_per_s(self) -> dict[str, float | None]:
        """Tokens per wall second and per second of process CPU time."""
        return {"wall": self.tokens / self.wall_s,
                "cpu": self.tokens / self.cpu_s if self.cpu_s else None}

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s()}


class Clock:
    """Wall and CPU stamps; on CUDA it first waits for the queued kernels, so a stamp marks finished work."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def stamp(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), time.process_time()


def timed_window(warmup: int, steps: int) -> int:
    """The warm-up actually used: at least one step (olm's window starts at a logged step), and one timed step."""
    if steps < 2:
        raise SystemExit("--steps must be at least 2 (one warm-up step and one timed step)")
    return max(1, min(warmup, steps - 1))


# --------------------------------------------------------------------------- data


def read_texts(shards: Iterable[Path], field: str = "text") -> Iterator[str]:
    """The documents of jsonl shards, in order."""
    for path in shards:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                text = json.loads(line).get(field)
                if isinstance(text, str) and text:
                    yield text


def pack_blocks(texts: Iterable[str], tokenizer: Any, block_size: int, count: int) -> list[np.ndarray]:
    """``count`` full blocks: documents tokenised, joined with EOS and cut every ``block_size`` tokens.

    The baselines train on these; olm packs the same shards with its own reader. Every block is
    full, so every contender computes on exactly ``batch x block_size`` tokens per step.
    """
    eos = int(tokenizer.eos_token_id)
    pending: list[np.ndarray] = []
    held = 0
    blocks: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        nonlocal held
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            pending.append(np.asarray([*ids, eos], dtype=np.int32))
            held += len(ids) + 1
        batch.clear()
        if held < block_size:
            return
        joined = np.concatenate(pending)
        whole = len(joined) // block_size * block_size
        blocks.extend(np.split(joined[:whole], whole // block_size))
        pending[:] = [joined[whole:]]
        held = len(joined) - whole

    for text in texts:
        batch.append(text)
        if len(batch) == 256:
            flush()
            if len(blocks) >= count:
                break
    if batch:
        flush()
    if len(blocks) < count:
        raise SystemExit(f"not enough text: {len(blocks)} blocks of {block_size} tokens, {count} needed")
    return blocks[:count]


def collate_batches(blocks: Sequence[np.ndarray], batch: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Consecutive blocks collated into batches of ``batch`` (the bare loop's input, built before timing)."""
    return [collate(list(blocks[i : i + batch]), pad_id) for i in range(0, len(blocks) - batch + 1, batch)]


# --------------------------------------------------------------------------- contenders


def run_bare(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Sequence[dict[str, torch.Tensor]],
             *, warmup: int, grad_clip: float, device: torch.device,
             autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> Window:
    """The floor: forward, backward, clip, step, zero_grad over pre-collated batches (moved to the device per step)."""
    clock = Clock(device)
    model.to(device).train()
    start: tuple[float, float] | None = None
    tokens = 0
    for step, batch in enumerate(batches, start=1):
        on_device = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with autocast():
            loss = model(**on_device, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == warmup:
            start = clock.stamp()
        elif step > warmup:
            tokens += int(batch["attention_mask"].sum())
    end = clock.stamp()
    assert start is not None, "fewer batches than warm-up steps"
    return Window(tokens, end[0] - start[0], end[1] - start[1], _peak_memory(device))


@dataclass(frozen=True)
class TrainerSettings:
    """The HF Trainer's optimiser and precision, matched to the recipe the other contenders use."""

    lr: float
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    schedule: str = "constant"  # transformers' lr_scheduler_type
    warmup_steps: int = 0
    bf16: bool = False  # autocast to bfloat16 (Accelerate), as olm's run.mixed_precision: bf16


def run_hf_trainer(model: torch.nn.Module, blocks: Sequence[np.ndarray], *, batch: int, steps: int, warmup: int,
                   settings: TrainerSettings, output_dir: Path, pad_id: int, device: torch.device) -> Window:
    """``transformers.Trainer`` for ``steps`` steps over a ``datasets.Dataset`` of ``blocks`` (shuffled by its sampler)."""
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    clock = Clock(device)
    stamps: dict[int, tuple[float, float]] = {}

    class StampWindow(TrainerCallback):
        # Stamps only at the window's two ends: a synchronize every step would slow the Trainer down.
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in (warmup, steps):
                stamps[state.global_step] = clock.stamp()

    dataset = Dataset.from_dict({"input_ids": [b.tolist() for b in blocks]})
    training_args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch, max_steps=steps,
        learning_rate=settings.lr, lr_scheduler_type=settings.schedule, warmup_steps=settings.warmup_steps,
        weight_decay=settings.weight_decay, adam_beta1=settings.betas[0], adam_beta2=settings.betas[1],
        max_grad_norm=settings.grad_clip, optim="adamw_torch_fused", bf16=settings.bf16,
        logging_strategy="no", save_strategy="no", report_to=[], use_cpu=device.type == "cpu",
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=lambda rows: collate([np.asarray(r["input_ids"]) for r in rows], pad_id),
                      callbacks=[StampWindow()])
    trainer.train()
    tokens = (steps - warmup) * batch * len(blocks[0])
    (w0, c0), (w1, c1) = stamps[warmup], stamps[steps]
    return Window(tokens, w1 - w0, c1 - c0, _peak_memory(device))


def run_olm(recipe: dict[str, Any], *, steps: int, warmup: int, device: torch.device) -> Window:
    """``olm train`` in this process; the window is read from the step lines of its ``metrics.jsonl``."""
    from olm_cli.increment import run_increment
    from olm_cli.recipe import recipe_from_dict

    outcome = run_increment(recipe_from_dict(recipe))
    if outcome.steps != steps:
        raise SystemExit(f"olm trained {outcome.steps} steps, not {steps}: {outcome}")
    lines = (Path(recipe["run"]["dir"]) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    by_step = {row["increment_step"]: row for row in map(json.loads, lines)
               if "increment_step" in row and not row.get("skipped")}
    start, end = by_step[warmup], by_step[steps]
    notes = []
    cpu = end["cpu_time"] - start["cpu_time"] if "cpu_time" in start and "cpu_time" in end else None
    if cpu is None:
        notes.append("olm's metrics.jsonl has no cpu_time: its CPU-time figures are null")
    wanted = recipe["batch"]["micro_batch"]
    used = sorted({by_step[s].get("micro_batch", wanted) for s in range(warmup + 1, steps + 1)})
    if used != [wanted]:
        # olm's out-of-memory back-off: the run went on, with smaller micro-batches than the baselines.
        notes.append(f"olm trained with micro-batch {used} instead of {wanted} (out-of-memory back-off)")
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    return Window(end["tokens"] - start["tokens"], end["time"] - start["time"], cpu, _peak_memory(device),
                  tuple(notes))


def _peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    """Free what the previous contender left and restart the peak counter, so each peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------- summaries


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """The contenders' order in one round: rotated, so warm-up and drift effects hit each alike."""
    shift = round_index % len(names)
    return [*names[shift:], *names[:shift]]


def median_ratio(numerators: Sequence[float | None], denominators: Sequence[float | None]) -> float | None:
    """Median of per-round ratios: rounds minutes apart on a shared machine drift; a ratio within a round cancels most of it."""
    pairs = [n / d for n, d in zip(numerators, denominators, strict=True) if n is not None and d]
    return statistics.median(pairs) if pairs else None


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
