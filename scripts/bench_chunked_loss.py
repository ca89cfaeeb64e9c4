"""Peak memory and step time of the task loss: standard (full logits) vs chunked through the LM head.

    .venv/bin/python scripts/bench_chunked_loss.py --json                      # SmolLM2-135M shape, 4 layers
    .venv/bin/python scripts/bench_chunked_loss.py --layers 30 --batch 4 --seq 1024 --device cuda

The model is built from a config (no download): SmolLM2-135M's widths and 49,152-token
vocabulary, with fewer layers by default so that a CPU measures the part that differs (the LM
head and its logits) in seconds. Each variant runs in a fresh subprocess, so its peak resident
memory is its own. On a CPU the figure is the peak resident memory (``ru_maxrss``) minus the
memory held between steps (weights and gradients): what one forward/backward allocates on top.
On CUDA it is ``torch.cuda.max_memory_allocated`` over the timed steps. No optimiser is run
(it is the same in both variants).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9,
                "num_key_value_heads": 3, "tie_word_embeddings": True, "max_position_embeddings": 8192}


def peak_bytes(device: str) -> int:
    import torch

    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_variant(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process: a few forward/backward steps, timed, with the memory they peak at."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from olm_cli.losses import ChunkedLMLoss
    from olm_cli.samples import collate, per_sample_loss

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M, num_hidden_layers=args.layers)).to(args.device)
    tokens = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.seq)).numpy()
    batch = {k: v.to(args.device) for k, v in collate(list(tokens), pad_id=0).items()}
    chunked = (ChunkedLMLoss(model, chunk_tokens=args.chunk_tokens, device=torch.device(args.device))
               if args.variant == "chunked" else None)

    def step() -> float:
        if chunked is not None:
            row_loss = chunked(model, batch)
        else:
            row_loss = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])[0]
        row_loss.mean().backward()
        model.zero_grad(set_to_none=False)  # gradients stay allocated, as under accumulation
        return float(row_loss.mean())

    step()  # warm-up: allocates gradients and kernels' workspaces
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak_bytes(args.device) if args.device == "cuda" else _current_rss()
    times, loss = [], 0.0
    for _ in range(args.steps):
        start = time.perf_counter()
        loss = step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"variant": args.variant, "peak_bytes": peak_bytes(args.device), "held_before_steps_bytes": before,
            "step_seconds_median": statistics.median(times), "loss": loss}


def _current_rss() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        import os

        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers (SmolLM2-135M has 30)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk-tokens", type=int, default=256, help="below batch x seq, or there is one chunk")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--variant", choices=["standard", "chunked"], help=argparse.SUPPRESS)  # the child
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    results = {}
    for variant in ("standard", "chunked"):
        child = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run([a for a in child if a != "--json"], check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    standard, chunked = results["standard"], results["chunked"]

    def growth(r: dict[str, Any]) -> int:
        return int(r["peak_bytes"] - r["held_before_steps_bytes"]) if args.device == "cpu" else int(r["peak_bytes"])

    report = {
        "shape": {**SMOLLM2_135M, "num_hidden_layers": args.layers}, "batch": args.batch, "seq": args.seq,
        "chunk_tokens": args.chunk_tokens, "device": args.device, "steps": args.steps, "variants": results,
        "peak_step_memory_bytes": {"standard": growth(standard), "chunked": growth(chunked)},
        "chunked_over_standard": {"peak_step_memory": growth(chunked) / max(1, growth(standard)),
                                  "step_time": chunked["step_seconds_median"] / standard["step_seconds_median"]},
        "loss_difference": abs(chunked["loss"] - standard["loss"]),
    }
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for name, r in results.items():
        print(f"{name:9s} peak step memory {growth(r) / 2**20:8.1f} MiB  step {r['step_seconds_median']:.3f} s  "
              f"loss {r['loss']:.5f}")
    ratio = report["chunked_over_standard"]
    print(f"chunked / standard: memory {ratio['peak_step_memory']:.2f}x, time {ratio['step_time']:.2f}x")


if __name__ == "__main__":
    main()
