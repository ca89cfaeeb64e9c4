#!/usr/bin/env python
"""What re-hashing a checkpoint before use costs: a SmolLM2-135M-shaped checkpoint, verified deep.

``olm train`` re-hashes every file of the checkpoint it resumes from against ``MANIFEST.json``
(and so do ``olm eval``, ``olm merge`` and ``olm replay-inspect``) before using it, so bytes
flipped on disk at the same size are never trained on. This script measures that price on a
realistic checkpoint: a Llama with SmolLM2-135M's shape (hidden 576, intermediate 1536, 30
layers, 9 heads, 3 KV heads, vocabulary 49152, tied embeddings; random weights, nothing is
downloaded), written with ``save_pretrained`` plus the AdamW state of the same shapes
(``optimizer.safetensors``) through :meth:`CheckpointManager.save`, about 1.6 GB in float32.

It times the cheap check (sizes only, what planning uses), then the deep check twice: with
the files still in the page cache (as right after a save) and after asking the kernel to drop
them (``posix_fadvise(DONTNEED)``: cold reads from the disk, what a nightly run resuming
yesterday's checkpoint usually gets). Wall time and CPU time (``time.process_time``) are
reported with the throughput in GB/s (10^9 bytes per second).

    python scripts/bench_verify_checkpoint.py            # writes ~1.6 GB under /tmp, then deletes it
    python scripts/bench_verify_checkpoint.py --json
    python scripts/bench_verify_checkpoint.py --dir /data/tmp --keep
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from olm_cli.rundir.checkpoint import CheckpointManager, format_bytes, read_manifest  # noqa: E402
from olm_cli.rundir.optimizer_state import save_optimizer_state  # noqa: E402

SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "max_position_embeddings": 8192,
}


def build_model_and_optimizer(seed: int) -> tuple[Any, Any]:
    """The model with random weights, and AdamW after one step so its moments exist (random too)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for param in model.parameters():
        param.grad = torch.randn_like(param)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def timed(action: Callable[[], object]) -> dict[str, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def drop_from_page_cache(directory: Path) -> None:
    """Ask the kernel to forget the files' cached pages, so the next read comes from the disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)  # only clean pages can be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def save_checkpoint(manager: CheckpointManager, seed: int) -> tuple[Path, int, dict[str, float]]:
    """Write the checkpoint the way the engine does; model and optimizer are freed on return."""
    model, optimizer = build_model_and_optimizer(seed)

    def write(directory: Path) -> None:
        model.save_pretrained(directory, safe_serialization=True)
        save_optimizer_state(directory, optimizer.state_dict())

    saved: dict[str, Path] = {}
    timing = timed(lambda: saved.setdefault("path", manager.save(1, write)))
    return saved["path"], sum(p.numel() for p in model.parameters()), timing


def run(workdir: Path, seed: int) -> dict[str, Any]:
    manager = CheckpointManager(workdir / "checkpoints")
    checkpoint, parameters, save = save_checkpoint(manager, seed)
    files = read_manifest(checkpoint)["files"]
    size = sum(int(f["size"]) for f in files)

    cheap = timed(lambda: manager.verify(checkpoint))
    warm = timed(lambda: manager.verify(checkpoint, deep=True))
    drop_from_page_cache(checkpoint)
    cold = timed(lambda: manager.verify(checkpoint, deep=True))
    for result in (warm, cold):
        result["gb_per_s"] = size / 1e9 / result["wall_s"]
    return {
        "model": "SmolLM2-135M shape, float32, random weights",
        "parameters": parameters,
        "files": {f["path"]: int(f["size"]) for f in files},
        "bytes": size,
        "save_with_manifest": save,
        "verify_sizes_only": cheap,
        "verify_deep_page_cache": warm,
        "verify_deep_cold": cold,
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version()},
    }


def render(report: dict[str, Any]) -> str:
    lines = [f"{report['model']}: {report['parameters']:,} parameters, "
             f"{report['bytes']:,} bytes ({format_bytes(report['bytes'])}) in {len(report['files'])} files"]
    save = report["save_with_manifest"]
    lines.append(f"  {'save (write + sha256 manifest + fsync):':<40}{save['wall_s']:.2f} s wall, {save['cpu_s']:.2f} s CPU")
    cheap = report["verify_sizes_only"]
    lines.append(f"  {'verify sizes only (planning):':<40}{cheap['wall_s'] * 1000:.2f} ms wall")
    for key, label in (("verify_deep_page_cache", "verify deep, files in page cache:"),
                       ("verify_deep_cold", "verify deep, cold (cache dropped):")):
        r = report[key]
        lines.append(f"  {label:<40}{r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU, {r['gb_per_s']:.2f} GB/s")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the checkpoint (default: a new folder under /tmp).")
    parser.add_argument("--keep", action="store_true", help="Leave the checkpoint on disk afterwards.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    workdir = Path(tempfile.mkdtemp(prefix="olm-bench-verify-", dir=args.dir))
    try:
        report = run(workdir, args.seed)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["kept"] = str(workdir) if args.keep else None
    print(json.dumps(report, indent=2) if args.json else render(report))


if __name__ == "__main__":
    main()
