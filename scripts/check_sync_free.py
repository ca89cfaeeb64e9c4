"""Check that an optimizer step waits for the accelerator once: at its one documented transfer.

    .venv/bin/python scripts/check_sync_free.py              # on a CUDA GPU
    .venv/bin/python scripts/check_sync_free.py --dry-run    # the same steps on a CPU, counted

Trains a few steps of a small from-scratch model (local synthetic shards, replay on) through
``olm train``'s engine. On CUDA every step, from its forward to ``optimizer.step()``, runs under
``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronising call except the
one inside :func:`olm_cli.host_sync.sync_allowed` (``fetch_step``: loss, per-sample losses and
gradient norm in one ``tolist()``). ``--dry-run`` runs the same code on a CPU, where sync debug
mode does not exist: :class:`olm_cli.host_sync.HostSyncCounter` counts the Python-level transfers
instead. Prints one JSON object; exits 1 when a step synchronised elsewhere.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

WORDS = "the river runs past the old mill and the miller sings of bread flour wheat stone water".split()


def write_shards(root: Path, shards: int, docs: int) -> None:
    rng = random.Random(0)
    for index in range(shards):
        path = root / "00-alpha" / f"shard-{index:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            for _ in range(docs):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 200)))
                handle.write(json.dumps({"text": text}) + "\n")


def recipe_for(work: Path, args: argparse.Namespace) -> Any:
    from olm_cli.recipe import recipe_from_dict

    return recipe_from_dict({
        "model": {"init": "scratch", "arch": {"size": "small", "vocab_size": 2048, "max_position_embeddings": 512}},
        "data": {"shards": [str(work / "stream" / "*" / "*.jsonl")], "block_size": 256},
        "batch": {"size": 8, "micro_batch": 4},
        "replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 256},
        "run": {"dir": str(work / "run"), "max_steps": args.steps, "checkpoint_every": 10_000, "progress": False,
                "mixed_precision": args.mixed_precision, "compile": args.compile,
                "loss_implementation": "chunked" if args.chunked else "standard"},
        "eval": {"after_increment": False},
        "release": {"enabled": False},
    })


def check(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from olm_cli import engine
    from olm_cli.host_sync import HostSyncCounter
    from olm_cli.increment import run_increment

    on_gpu = not args.dry_run
    counter = HostSyncCounter()
    counter.counting = False
    steps: list[dict[str, Any]] = []
    errors: list[str] = []
    real_forward_backward, real_bookkeep, real_train = (
        engine.Trainer._forward_backward, engine.Trainer._bookkeep, engine.Trainer.train)

    def forward_backward(self: engine.Trainer, *a: Any, **k: Any) -> Any:
        counter.count = counter.allowed = 0
        counter.where.clear()
        counter.counting = True
        if on_gpu:
            torch.cuda.set_sync_debug_mode("error")
        return real_forward_backward(self, *a, **k)

    def bookkeep(self: engine.Trainer, *a: Any, **k: Any) -> Any:
        if on_gpu:
            torch.cuda.set_sync_debug_mode(0)
        counter.counting = False
        steps.append({"transfers": counter.count, "documented": counter.allowed, "elsewhere": list(counter.where)})
        return real_bookkeep(self, *a, **k)

    def train(self: engine.Trainer) -> Any:
        with counter:
            try:
                return real_train(self)
            except RuntimeError as exc:  # sync debug mode "error" raises a RuntimeError at the syncing call
                if on_gpu:
                    torch.cuda.set_sync_debug_mode(0)
                errors.append(str(exc).splitlines()[0])
                raise

    engine.Trainer._forward_backward = forward_backward  # type: ignore[method-assign]
    engine.Trainer._bookkeep = bookkeep  # type: ignore[method-assign]
    engine.Trainer.train = train  # type: ignore[method-assign]
    with tempfile.TemporaryDirectory(prefix="olm-sync-check-") as tmp:
        work = Path(tmp)
        write_shards(work / "stream", shards=2, docs=60)
        try:
            outcome = run_increment(recipe_for(work, args))
            status = outcome.status
        except RuntimeError:
            status = "synchronised"
    ok = not errors and len(steps) == args.steps and all(s["documented"] == 1 and not s["elsewhere"] for s in steps)
    return {"device": "cuda" if on_gpu else "cpu (dry run: Python-level transfers counted)",
            "check": "torch.cuda.set_sync_debug_mode('error')" if on_gpu else "HostSyncCounter",
            "status": status, "steps": len(steps), "per_step": steps, "errors": errors, "ok": ok}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU and count transfers (no CUDA needed)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--chunked", action="store_true", help="run.loss_implementation: chunked")
    parser.add_argument("--compile", action="store_true", help="run.compile: true")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16"])
    args = parser.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to run the same steps on the CPU", file=sys.stderr)
        return 2
    report = check(args)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
