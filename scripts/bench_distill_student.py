#!/usr/bin/env python
"""Distillation into a smaller student: the student's held-out loss with and without its teacher.

A teacher (the ``tiny`` preset, ~1.9M parameters with a 2k vocabulary) is trained from scratch
on the offline demo stream (``scripts/build_demo_data.py``: code, prose, drama in one increment).
The shards are read through a shuffle buffer larger than the data, so every batch mixes the
domains. Then a student a quarter of its width and half its depth (``init: scratch``, the teacher's
tokenizer through ``model.tokenizer``) is trained on the same shards for the same number of steps,
with the same seed, twice:

* ``student``:         plain cross-entropy (``distill.method: none``),
* ``student+teacher``: ``distill.method: teacher`` from the teacher's release, loss =
  alpha * CE + (1 - alpha) * T^2 * KL(teacher || student) at temperature T.

Both arms see the same batches (same data order and seed), so the difference is the teacher
term. The reported loss is the engine's held-out evaluation after the increment (per domain and
the mean), which is plain cross-entropy for both arms. Every increment runs through
:func:`olm_cli.increment.run_increment`, exactly what ``olm train`` runs.

    python scripts/bench_distill_student.py --json                 # ~10 min on 2 busy CPU cores
    python scripts/bench_distill_student.py --smoke --json         # ~1 min sanity run
    python scripts/bench_distill_student.py --student-steps 400 --alpha 0.3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL: dict[str, Any] = {
    "shards_per_domain": 4,
    "shard_kb": 150,
    "eval_kb": 20,
    "vocab_size": 2048,
    "teacher_arch": {"size": "tiny"},  # hidden 128, 4 layers
    "student_arch": {"size": "tiny", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 96},
    "block_size": 128,
    "batch": 16,
    "teacher_steps": 600,  # one pass over the data, about 400 steps, when the data is shorter
    "student_steps": 200,
    "eval_max_tokens": 20_000,
    # Larger than the data in blocks: every batch mixes the three domains, so neither model's
    # result depends on which domain its last steps happened to read.
    "shuffle_buffer": 20_000,
}
SMOKE: dict[str, Any] = {
    **FULL,
    "shards_per_domain": 1,
    "shard_kb": 12,
    "eval_kb": 4,
    "vocab_size": 512,
    "teacher_arch": {"size": "tiny", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 160},
    "student_arch": {"size": "tiny", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                     "intermediate_size": 64},
    "block_size": 64,
    "batch": 8,
    "teacher_steps": 60,
    "student_steps": 30,
    "eval_max_tokens": 2_000,
}


def build_data(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    out = work / "data"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_demo_data.py"), "--out", str(out), "--offline-only",
                    "--shards-per-domain", str(settings["shards_per_domain"]), "--shard-kb", str(settings["shard_kb"]),
                    "--eval-kb", str(settings["eval_kb"]), "--force"], check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "manifest.json").read_text(encoding="utf-8")) | {"root": str(out)}


def recipe(work: Path, name: str, data: dict[str, Any], settings: dict[str, Any], *, arch: dict[str, Any],
           steps: int, lr: float, seed: int, tokenizer: str | None = None,
           distill: dict[str, Any] | None = None) -> dict[str, Any]:
    root = Path(data["root"])
    return {
        "model": {"init": "scratch", "tokenizer": tokenizer,
                  "arch": {**arch, "vocab_size": settings["vocab_size"], "max_position_embeddings": 512}},
        "data": {"shards": [str(root / "train" / "*" / "*.jsonl")], "block_size": settings["block_size"],
                 "shuffle_buffer": settings["shuffle_buffer"]},
        "batch": {"size": settings["batch"], "micro_batch": settings["batch"]},
        "distill": distill or {"method": "none"},
        "optim": {"lr": lr, "warmup_steps": 10},
        "run": {"dir": str(work / name), "seed": seed, "max_steps": steps, "checkpoint_every": 10_000,
                "progress": False},
        "eval": {"sets": {d["name"]: str(root / d["eval"]) for d in data["domains"]},
                 "max_tokens": settings["eval_max_tokens"], "batch_size": 16},
    }


def train(config: dict[str, Any]) -> dict[str, Any]:
    """One increment through the engine; the held-out losses it recorded and the wall time."""
    from olm_cli.evaluation.domains import HISTORY_FILE
    from olm_cli.increment import run_increment
    from olm_cli.recipe import recipe_from_dict

    started = time.perf_counter()
    outcome = run_increment(recipe_from_dict(config))
    if outcome.status != "increment_complete":
        raise RuntimeError(f"{config['run']['dir']}: {outcome.status} {outcome.message}")
    seconds = time.perf_counter() - started
    rows = (Path(config["run"]["dir"]) / HISTORY_FILE).read_text(encoding="utf-8").splitlines()
    losses = {name: r["loss"] for name, r in json.loads(rows[-1])["domains"].items()}
    return {"losses": losses, "mean_loss": sum(losses.values()) / len(losses), "steps": outcome.steps,
            "seconds": round(seconds, 1)}


def parameters(run_dir: Path) -> int:
    """Parameters of the model a run released (what serving would load)."""
    from safetensors.torch import load_file

    weights = load_file(str(run_dir / "releases" / "latest" / "model.safetensors"))
    return sum(tensor.numel() for tensor in weights.values())


def run(settings: dict[str, Any], *, work: Path, seed: int, alpha: float, temperature: float,
        say: Any) -> dict[str, Any]:
    data = build_data(work, settings)
    say(f"teacher: {settings['teacher_steps']} steps")
    teacher_cfg = recipe(work, "teacher", data, settings, arch=settings["teacher_arch"], steps=settings["teacher_steps"],
                         lr=2e-3, seed=seed)
    teacher = train(teacher_cfg)
    release = str(work / "teacher" / "releases" / "latest")
    arms: dict[str, Any] = {}
    for name, distill in (("student", None),
                          ("student+teacher", {"method": "teacher", "teacher": release, "alpha": alpha,
                                               "temperature": temperature})):
        say(f"{name}: {settings['student_steps']} steps")
        cfg = recipe(work, name, data, settings, arch=settings["student_arch"], steps=settings["student_steps"],
                     lr=3e-3, seed=seed, tokenizer=release, distill=distill)
        arms[name] = train(cfg) | {"parameters": parameters(work / name)}
    plain, taught = arms["student"]["mean_loss"], arms["student+teacher"]["mean_loss"]
    return {
        "settings": {k: v for k, v in settings.items()} | {"seed": seed, "alpha": alpha, "temperature": temperature},
        "teacher": teacher | {"parameters": parameters(work / "teacher")},
        "arms": arms,
        "teacher_gain": plain - taught,  # > 0: the teacher lowered the student's held-out loss
    }


def render(result: dict[str, Any]) -> str:
    domains = list(result["teacher"]["losses"])
    lines = [f"| model | parameters | steps | {' | '.join(domains)} | mean | seconds |",
             "|---|---:|---:|" + "---:|" * len(domains) + "---:|---:|"]
    rows = [("teacher", result["teacher"]), *result["arms"].items()]
    for name, arm in rows:
        losses = " | ".join(f"{arm['losses'][d]:.3f}" for d in domains)
        lines.append(f"| {name} | {arm['parameters']:,} | {arm['steps']} | {losses} | {arm['mean_loss']:.3f} | "
                     f"{arm['seconds']} |")
    lines.append(f"\nteacher gain (student - student+teacher, mean held-out loss): {result['teacher_gain']:+.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a ~1 min sanity run")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.5, help="distill.alpha: weight of the CE term (default 0.5)")
    parser.add_argument("--temperature", type=float, default=2.0, help="distill.temperature (default 2)")
    parser.add_argument("--teacher-steps", type=int, help="override the teacher's steps")
    parser.add_argument("--student-steps", type=int, help="override the students' steps (equal for both arms)")
    parser.add_argument("--work", type=Path, help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    settings = dict(SMOKE if args.smoke else FULL)
    if args.teacher_steps:
        settings["teacher_steps"] = args.teacher_steps
    if args.student_steps:
        settings["student_steps"] = args.student_steps

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="olm-bench-distill-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(settings, work=work, seed=args.seed, alpha=args.alpha, temperature=args.temperature, say=say)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
