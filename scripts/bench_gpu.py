#!/usr/bin/env python
"""Training throughput, MFU and peak memory on one GPU: olm vs a bare PyTorch loop vs the HF Trainer.

Models are built from a config (nothing is downloaded), seeded, and saved once, so every
contender starts from the same weights:

* ``135m`` -- SmolLM2-135M's shape: hidden 576, MLP 1536, 30 layers, 9 heads (3 KV heads),
  vocabulary 49,152, tied embeddings (134.5M parameters);
* ``1b`` -- Llama-3.2-1B's shape: hidden 2048, MLP 8192, 16 layers, 32 heads (8 KV heads),
  vocabulary 128,256, tied embeddings (1.24B parameters).

Sequences are 2048 tokens. Precision ``autocast`` (the default) keeps float32 weights and AdamW
state and runs the forward and backward under bf16 autocast in every contender (olm:
``run.mixed_precision: bf16``; Trainer: ``bf16=True``; bare: ``torch.autocast``);
``--precision bf16`` holds the weights themselves in bfloat16 (olm: ``model.dtype``) with no
autocast. The text is synthetic (Zipf-distributed pseudo-words, generated here) tokenised by
an 8,192-token byte-level BPE trained on it: token ids stay below 8,192, but the embedding and
LM head have the model's full vocabulary, so they cost what they cost in the real model. What
each contender does is described in ``scripts/bench_loops.py``; olm trains through
``run_increment`` with a random selector, no replay, a constant learning rate and no release.

Reported per model and contender: tokens/s (wall; the window is steps ``--warmup``+1 ..
``--steps``), MFU = tokens/s x FLOPs per token / the device's peak dense bf16 FLOP/s, with
FLOPs per token = 6 N + 12 L d T (N: parameters that take part in a matmul -- all but the
input embedding table, which with tied embeddings is the LM head and counts once; L layers,
d hidden size, T sequence length), and ``torch.cuda.max_memory_allocated``. Peak FLOP/s come
from the device name (H100 SXM and H200 989e12, H100 PCIe 756e12, H100 NVL 835e12, A100
312e12; others: ``--peak-flops`` or MFU null). Targets: olm >= 0.95x the bare loop (each model)
and olm MFU >= 40% at 1B.

``--dry-run`` runs the same code on the CPU at toy shapes (float32, a few steps, < 1 minute),
so CI exercises it; its figures mean nothing. A contender that runs out of memory is reported as
such and the others still run.

    python scripts/bench_gpu.py --json > bench_gpu.json      # ~4-6 minutes on one H200
    python scripts/bench_gpu.py --models 1b --steps 40
    python scripts/bench_gpu.py --dry-run --json             # CPU, plumbing only

``--fsdp`` adds a fourth contender, ``olm_fsdp``: olm with ``run.distributed: fsdp`` on the same
device, a world of one (``fully_shard`` per decoder layer, every collective a no-op copy), and
reports ``fsdp_over_olm`` (its tokens/s over plain olm's, which is what each DDP rank runs) and
``fsdp_overhead`` = 1 - that ratio: the price of FSDP2's parameter handling itself, before any
communication. ``--dry-run --fsdp`` exercises the sharded path on the CPU (gloo).

    python scripts/bench_gpu.py --fsdp --models 1b --json   # FSDP2 overhead vs unsharded, one GPU
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_loops import (  # noqa: E402
    CONTENDERS,
    TrainerSettings,
    Window,
    collate_batches,
    median,
    median_ratio,
    pack_blocks,
    read_texts,
    reset_peak_memory,
    rotated,
    run_bare,
    run_hf_trainer,
    run_olm,
    timed_window,
)

from olm_cli.engine import build_optimizer  # noqa: E402
from olm_cli.errors import OlmError  # noqa: E402
from olm_cli.modeling import save_tokenizer, train_tokenizer  # noqa: E402
from olm_cli.recipe import ModelConfig, apply_overrides, recipe_from_dict  # noqa: E402


@dataclass(frozen=True)
class ModelShape:
    """A Llama built from config, and the batch it trains with."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    batch: int  # sequences per step on a >= 120 GB GPU
    batch_80gb: int  # on a smaller one (H100 80 GB)
    seq: int = 2048
    rope_theta: float = 10_000.0


MODELS = {
    "135m": ModelShape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49_152, tied=True,
                       batch=16, batch_80gb=16, rope_theta=100_000.0),
    "1b": ModelShape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128_256, tied=True,
                     batch=8, batch_80gb=4, rope_theta=500_000.0),
}
# The dry run: the same code at toy sizes (each model keeps its tying and head grouping).
DRY_RUN = {"135m": replace(MODELS["135m"], hidden=48, intermediate=96, layers=2, heads=3, kv_heads=1, vocab=512,
                           batch=2, batch_80gb=2, seq=64),
           "1b": replace(MODELS["1b"], hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=640,
                         batch=2, batch_80gb=2, seq=64)}
TOKENIZER_VOCAB = 8192
# Dense bf16 peak FLOP/s by device name (first match wins: the specific H100 variants before SXM).
PEAK_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12))
TARGET_OLM_OVER_BARE = 0.95
TARGET_MFU_1B = 0.40
LR = 1e-4


# --------------------------------------------------------------------------- models and data


def build_and_save(shape: ModelShape, tokenizer: Any, directory: Path, dtype: torch.dtype,
                   device: torch.device) -> dict[str, int]:
    """A seeded Llama of ``shape``, saved with the tokenizer so that every contender loads the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied, max_position_embeddings=max(2048, shape.seq), rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(0)
    with device:  # initialised where it will train: seconds for 1B on a GPU, a minute on the CPU
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer, directory)
    total = sum(p.numel() for p in model.parameters())  # unique parameters: a tied table counts once
    embedding = model.get_input_embeddings().weight.numel()
    return {"parameters": total, "matmul_parameters": total if shape.tied else total - embedding}


def flops_per_token(matmul_parameters: int, shape: ModelShape) -> int:
    """6 N (forward + backward through every matmul) + 12 L d T (attention scores and values)."""
    return 6 * matmul_parameters + 12 * shape.layers * shape.hidden * shape.seq


def synthetic_documents(seed: int) -> Iterator[str]:
    """Endless documents of Zipf-distributed pseudo-words: text with a realistic token spread, made offline."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    lexicon = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(20_000)]
    cumulative = list(itertools.accumulate(1.0 / rank for rank in range(1, len(lexicon) + 1)))
    while True:
        words = rng.choices(lexicon, cum_weights=cumulative, k=rng.randint(150, 1500))
        yield " ".join(words) + "."


def write_shards(directory: Path, documents: Iterator[str], count: Callable[[list[str]], int], at_least: int,
                 shards: int = 2) -> list[Path]:
    """Jsonl shards holding ``at_least`` units of text as ``count`` measures them (tokens, characters),
    in few files so that olm's per-shard tail blocks are rare."""
    docs: list[str] = []
    held = 0
    while held < at_least:
        chunk = [next(documents) for _ in range(64)]
        held += count(chunk)
        docs.extend(chunk)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per_shard = -(-len(docs) // shards)
    for index in range(shards):
        path = directory / f"shard-{index:03d}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[index * per_shard:(index + 1) * per_shard]),
                        encoding="utf-8")
        paths.append(path)
    return paths


def batch_size(shape: ModelShape, args: argparse.Namespace, device: torch.device) -> int:
    """``--batch``, else the model's batch for this device's memory."""
    if args.batch is not None:
        return int(args.batch)
    if device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory < 120 * 2**30:
        return shape.batch_80gb
    return shape.batch


def peak_flops(device: torch.device, override: float | None) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", override
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    return name, next((flops for key, flops in PEAK_BF16 if key in name), None)


# --------------------------------------------------------------------------- contenders


@dataclass
class Bench:
    """What every contender of one model needs."""

    name: str
    shape: ModelShape
    model_dir: Path
    data_dir: Path
    work: Path
    blocks: list[Any]
    pad_id: int
    device: torch.device
    args: argparse.Namespace

    @property
    def autocast(self) -> bool:
        return self.args.precision == "autocast" and self.device.type == "cuda"

    @property
    def weights_dtype(self) -> str:
        return "bfloat16" if self.args.precision == "bf16" and self.device.type == "cuda" else "float32"

    def recipe(self, run_dir: Path) -> dict[str, Any]:
        """olm's recipe: the saved model, the shards, the same batch and AdamW, nothing else switched on."""
        model: dict[str, Any] = {"init": "pretrained", "name_or_path": str(self.model_dir), "dtype": self.weights_dtype}
        if self.args.attn != "sdpa":
            if "attn_implementation" not in ModelConfig.model_fields:
                raise SystemExit("--attn: this olm has no model.attn_implementation; only sdpa (transformers' default) "
                                 "can be compared")
            model["attn_implementation"] = self.args.attn
        recipe = {
            "model": model,
            "data": {"shards": [str(self.data_dir)], "block_size": self.shape.seq},
            "selector": {"name": "random"},
            "batch": {"size": self.batch, "micro_batch": self.batch},
            "optim": {"lr": LR, "warmup_steps": 0, "schedule": "constant", "grad_clip": 1.0},
            "run": {"dir": str(run_dir), "max_steps": self.args.steps, "checkpoint_every": 1_000_000,
                    "progress": False, "seed": 0, "mixed_precision": "bf16" if self.autocast else "no"},
            "release": {"enabled": False},
        }
        return apply_overrides(recipe, self.args.olm_set)

    @property
    def batch(self) -> int:
        return batch_size(self.shape, self.args, self.device)

    def load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        dtype = torch.bfloat16 if self.weights_dtype == "bfloat16" else torch.float32
        model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=dtype,
                                                                       attn_implementation=self.args.attn)
        return model.to(self.device)

    def autocast_context(self) -> Any:
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()


def run_olm_contender(bench: Bench, run_dir: Path) -> Window:
    try:
        return run_olm(bench.recipe(run_dir), steps=bench.args.steps, warmup=bench.args.warmup, device=bench.device)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)  # a 1B checkpoint is ~15 GB


def run_olm_fsdp_contender(bench: Bench, run_dir: Path) -> Window:
    """olm sharded with FSDP2 over a world of one (``--fsdp``)."""
    recipe = bench.recipe(run_dir)
    recipe["run"]["distributed"] = "fsdp"
    try:
        return run_olm(recipe, steps=bench.args.steps, warmup=bench.args.warmup, device=bench.device)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def run_bare_contender(bench: Bench, run_dir: Path) -> Window:
    model = bench.load_model()
    recipe = recipe_from_dict(bench.recipe(run_dir))
    batches = collate_batches(bench.blocks, bench.batch, bench.pad_id)[: bench.args.steps]
    return run_bare(model, build_optimizer(model, recipe), batches, warmup=bench.args.warmup,
                    grad_clip=recipe.optim.grad_clip, device=bench.device, autocast=bench.autocast_context)


def run_trainer_contender(bench: Bench, run_dir: Path) -> Window:
    optim = recipe_from_dict(bench.recipe(run_dir)).optim
    settings = TrainerSettings(lr=optim.lr, weight_decay=optim.weight_decay, betas=optim.betas,
                               grad_clip=optim.grad_clip, bf16=bench.autocast)
    try:
        return run_hf_trainer(bench.load_model(), bench.blocks, batch=bench.batch, steps=bench.args.steps,
                              warmup=bench.args.warmup, settings=settings, output_dir=run_dir, pad_id=bench.pad_id,
                              device=bench.device)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


# One device each; olm_fsdp only with --fsdp.
CONTENDER_RUNNERS: dict[str, Callable[[Bench, Path], Window]] = {
    "olm": run_olm_contender, "bare": run_bare_contender, "hf_trainer": run_trainer_contender,
    "olm_fsdp": run_olm_fsdp_contender,
}


def contenders(args: argparse.Namespace) -> tuple[str, ...]:
    return (*CONTENDERS, "olm_fsdp") if args.fsdp else tuple(CONTENDERS)


def measure(bench: Bench, name: str, run_dir: Path) -> dict[str, Any]:
    """One contender, once. A failure is recorded (and makes the exit status 1) and the others still run:
    one GPU session has minutes of device time, and the other contenders' figures are still worth having."""
    reset_peak_memory(bench.device)
    try:
        return CONTENDER_RUNNERS[name](bench, run_dir).as_dict()
    except torch.OutOfMemoryError as exc:
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, the table and on stderr
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}
    finally:
        reset_peak_memory(bench.device)


# --------------------------------------------------------------------------- report


def summarise(bench: Bench, rounds: list[dict[str, Any]], sizes: dict[str, int], peak: float | None) -> dict[str, Any]:
    per_token = flops_per_token(sizes["matmul_parameters"], bench.shape)

    def wall_rates(name: str) -> list[float | None]:
        return [r[name]["tokens_per_s"]["wall"] if "tokens_per_s" in r[name] else None for r in rounds]

    measured = [name for name in CONTENDER_RUNNERS if name in rounds[0]]
    contenders: dict[str, Any] = {}
    for name in measured:
        rate = median(wall_rates(name))
        peaks = [r[name].get("peak_memory_bytes") for r in rounds if r[name].get("peak_memory_bytes") is not None]
        errors = [r[name]["error"] for r in rounds if "error" in r[name]]
        notes = sorted({note for r in rounds for note in r[name].get("notes", ())})
        contenders[name] = {
            "tokens_per_s": rate,
            "mfu": rate * per_token / peak if rate is not None and peak else None,
            "peak_memory_gib": max(peaks) / 2**30 if peaks else None,
            **({"errors": errors} if errors else {}),
            **({"notes": notes} if notes else {}),
        }
    return {
        "shape": asdict(bench.shape), "batch": bench.batch, "tokens_per_step": bench.batch * bench.shape.seq,
        **sizes, "flops_per_token": per_token,
        "contenders": contenders,
        "olm_over_bare": median_ratio(wall_rates("olm"), wall_rates("bare")),
        "olm_over_trainer": median_ratio(wall_rates("olm"), wall_rates("hf_trainer")),
        **(fsdp_overhead(wall_rates("olm_fsdp"), wall_rates("olm")) if "olm_fsdp" in measured else {}),
        "rounds": rounds,
    }


def fsdp_overhead(fsdp: list[float | None], unsharded: list[float | None]) -> dict[str, float | None]:
    """FSDP2 at world 1 against olm unsharded (what a DDP rank runs): the ratio of tokens/s and 1 - it."""
    ratio = median_ratio(fsdp, unsharded)
    return {"fsdp_over_olm": ratio, "fsdp_overhead": None if ratio is None else 1.0 - ratio}


def verdicts(models: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    def judged(model: str, target: str, minimum: float, value: float | None) -> dict[str, Any]:
        return {"model": model, "target": target, "min": minimum, "value": value,
                "pass": None if value is None else value >= minimum}

    rows = [judged(name, "olm_over_bare", TARGET_OLM_OVER_BARE, m["olm_over_bare"]) for name, m in models.items()]
    if "1b" in models:
        rows.append(judged("1b", "olm_mfu", TARGET_MFU_1B, models["1b"]["contenders"]["olm"]["mfu"]))
    return rows


def print_tables(report: dict[str, Any]) -> None:
    device = report["device"]
    print(f"\n{device['name']}, peak bf16 {device['peak_bf16_flops'] or 'unknown'} FLOP/s, precision "
          f"{report['precision']}, {report['args']['steps']} steps ({report['args']['warmup']} warm-up), "
          f"{report['args']['rounds']} round(s){' -- DRY RUN, figures mean nothing' if report['dry_run'] else ''}")
    for name, model in report["models"].items():
        print(f"\n{name}: {model['parameters'] / 1e6:,.1f}M params, batch {model['batch']} x {model['shape']['seq']}, "
              f"{model['flops_per_token'] / 1e9:.2f} GFLOP/token")
        print(f"{'loop':<12}{'tokens/s':>12}{'MFU':>8}{'peak GiB':>10}")
        for contender, row in model["contenders"].items():
            rate = "failed" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
            mfu = "-" if row["mfu"] is None else f"{row['mfu']:.1%}"
            memory = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.1f}"
            remarks = "; ".join(row.get("errors", []) + row.get("notes", []))
            print(f"{contender:<12}{rate:>12}{mfu:>8}{memory:>10}  {remarks}".rstrip())
        for ratio in ("olm_over_bare", "olm_over_trainer", "fsdp_over_olm"):
            if ratio in model:
                value = model[ratio]
                print(f"{ratio} = {'n/a' if value is None else f'{value:.3f}'}")
        if model.get("fsdp_overhead") is not None:
            print(f"fsdp_overhead = {model['fsdp_overhead']:.3f} (1 - fsdp_over_olm: the share of unsharded olm's "
                  "tokens/s, a DDP rank's, that FSDP2 at world 1 gives up)")
    print("\ntargets:")
    for row in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "not measured"}[row["pass"]]
        value = "n/a" if row["value"] is None else f"{row['value']:.3f}"
        print(f"  {row['model']:<5} {row['target']:<14} >= {row['min']:.2f}: {value} {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="135m,1b", help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps per contender (default 30; dry run 3)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps not timed")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, contenders rotated (GPU timings are steady)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step for every model (default: per model)")
    parser.add_argument("--precision", choices=("autocast", "bf16"), default="autocast",
                        help="autocast: fp32 weights, bf16 autocast; bf16: bf16 weights, no autocast")
    parser.add_argument("--attn", default="sdpa", help="attention implementation of every contender")
    parser.add_argument("--olm-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for olm's contender (e.g. run.compile=true); repeatable")
    parser.add_argument("--peak-flops", type=float, default=None, help="the device's peak bf16 FLOP/s (for MFU)")
    parser.add_argument("--fsdp", action="store_true",
                        help="also olm with run.distributed: fsdp (world 1) and its overhead vs unsharded olm")
    parser.add_argument("--dry-run", action="store_true", help="CPU, toy shapes, float32: the code path only")
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress on stderr)")
    args = parser.parse_args()
    args.steps = args.steps if args.steps is not None else (3 if args.dry_run else 30)
    args.warmup = timed_window(args.warmup, args.steps)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    if not chosen or any(m not in MODELS for m in chosen):
        parser.error(f"--models: choose from {', '.join(MODELS)}")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no GPU is available: run with --dry-run to check the code path on the CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    shapes = DRY_RUN if args.dry_run else MODELS
    device_name, peak = peak_flops(device, args.peak_flops)
    progress = sys.stderr if args.json else sys.stdout
    began = time.monotonic()

    def say(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", file=progress, flush=True)

    transformers.utils.logging.disable_progress_bar()
    # Libraries print to stdout (the Trainer its summary); with --json, stdout holds the JSON alone.
    with tempfile.TemporaryDirectory(dir=args.work) as tmp, contextlib.redirect_stdout(progress):
        root = Path(tmp)
        documents = synthetic_documents(seed=0)
        tokenizer_text = write_shards(root / "tokenizer-text", documents, lambda chunk: sum(map(len, chunk)),
                                      2_000_000, shards=1)
        vocab = min(TOKENIZER_VOCAB, *(shapes[m].vocab for m in chosen))
        tokenizer = train_tokenizer(tokenizer_text, "text", vocab, 2_000_000)
        seq = max(shapes[m].seq for m in chosen)
        most = max(batch_size(shapes[m], args, device) for m in chosen) * args.steps * seq

        def count_tokens(chunk: list[str]) -> int:
            return sum(len(ids) + 1 for ids in tokenizer(chunk, add_special_tokens=False)["input_ids"])

        shards = write_shards(root / "data" / "synthetic", documents, count_tokens, int(most * 1.1) + 4 * seq)
        say(f"{len(shards)} shards of synthetic text, a {len(tokenizer):,}-token tokenizer")
        models: dict[str, Any] = {}
        for index, name in enumerate(chosen):
            shape = shapes[name]
            sizes = build_and_save(shape, tokenizer, root / f"model-{name}",
                                   torch.bfloat16 if device.type == "cuda" else torch.float32, device)
            bench = Bench(name, shape, root / f"model-{name}", shards[0].parent, root, [], int(tokenizer.pad_token_id),
                          device, args)
            try:  # a bad --olm-set fails here, before any device time is spent
                recipe_from_dict(bench.recipe(root / "check"))
            except OlmError as exc:
                raise SystemExit(f"error: olm's recipe ({' '.join(args.olm_set) or 'no --olm-set'}): {exc}") from None
            bench.blocks = pack_blocks(read_texts(shards), tokenizer, shape.seq, bench.batch * args.steps)
            say(f"{name}: {sizes['parameters']:,} parameters, batch {bench.batch} x {shape.seq}")
            rounds = []
            for r in range(args.rounds):
                order = rotated(contenders(args), r + index)
                results = {}
                for contender in order:
                    results[contender] = measure(bench, contender, root / f"run-{name}-{contender}-{r}")
                    rate = results[contender].get("tokens_per_s", {}).get("wall")
                    say(f"{name} round {r + 1} {contender}: "
                        + (f"{rate:,.0f} tokens/s" if rate else results[contender].get("error", "?")))
                rounds.append({"round": r + 1, "order": order, **results})
            models[name] = summarise(bench, rounds, sizes, peak)
            shutil.rmtree(root / f"model-{name}", ignore_errors=True)

    report = {
        "benchmark": "bench_gpu", "dry_run": args.dry_run,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": device_name, "peak_bf16_flops": peak,
                   "total_memory_gib": (torch.cuda.get_device_properties(device).total_memory / 2**30
                                        if device.type == "cuda" else None)},
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "precision": ("autocast bf16, fp32 weights" if args.precision == "autocast" else "bf16 weights")
        if device.type == "cuda" else "float32 (dry run)",
        "args": {"models": chosen, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                 "attn": args.attn, "olm_set": args.olm_set, "fsdp": args.fsdp},
        "tokenizer_vocab": vocab, "seconds": round(time.monotonic() - began, 1),
        "models": models,
        "targets": verdicts(models),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_tables(report)
    failed = [f"{m} {c}" for m, model in models.items() for c, row in model["contenders"].items() if "errors" in row]
    if failed:
        raise SystemExit(f"error: contender(s) failed: {', '.join(failed)} (see 'errors' in the report)")


if __name__ == "__main__":
    main()
