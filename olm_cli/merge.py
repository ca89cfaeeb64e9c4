"""``olm merge``: weighted parameter averaging of HF checkpoints (model soups, federated averaging).

Only safetensors are read -- a checkpoint is data, and unpickling ``.bin`` files would execute
code. Tensors are averaged one name at a time in float32 and written in the first checkpoint's
dtype, so peak memory is one output model plus one accumulator tensor. An olm checkpoint (one
with a ``MANIFEST.json``) is re-hashed first, so bytes flipped on disk are never averaged into
the result; a file that cannot be read is one error line naming the checkpoint.

A run directory stands for its release (``releases/latest``, what that site serves). With
``--weights tokens`` each run's release is weighted by the tokens its shard ledger trained into
it, ``n_k / n``: FedAvg's weighting by client sample count (McMahan et al., arXiv 1602.05629),
for sites that each train the same base on their own data and share only weights. Averaging is
only meaningful between models with one architecture and one tokenizer: their ``config.json``
and vocabularies are compared first, and a difference is a usage error naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from olm_cli.errors import EXIT_USAGE, CheckpointError, OlmError, RecipeError
from olm_cli.rundir.atomic import publishing_directory
from olm_cli.rundir.checkpoint import MANIFEST_FILENAME, loading_checkpoint, verify_checkpoint

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Everything from_pretrained and AutoTokenizer need besides the weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    """Weights summing to 1; None means a uniform average. Sample counts work as weights."""
    if weights is None:
        return [1.0 / count] * count
    if len(weights) != count:
        raise CheckpointError(f"got {len(weights)} weights for {count} checkpoints")
    values = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in values):
        raise CheckpointError(f"merge weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise CheckpointError("merge weights sum to zero")
    return [w / total for w in values]


def weight_files(checkpoint: Path) -> list[Path]:
    """The safetensors files holding a checkpoint's weights (single file or sharded)."""
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} is not a directory")
    single = checkpoint / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = checkpoint / INDEX_NAME
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError, AttributeError) as exc:  # AttributeError: not a JSON object
            raise CheckpointError(f"checkpoint {checkpoint}: {INDEX_NAME} is unreadable ({exc})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (checkpoint / f).is_file()]
        if missing:
            raise CheckpointError(f"checkpoint {checkpoint} is missing shard(s) {missing}")
        return [checkpoint / f for f in files]
    if any(checkpoint.glob("*.bin")):
        raise CheckpointError(
            f"checkpoint {checkpoint} has only pickle (.bin) weights; olm reads safetensors only "
            "(re-save it with save_pretrained(safe_serialization=True))"
        )
    raise CheckpointError(f"checkpoint {checkpoint} has no {WEIGHTS_NAME} or {INDEX_NAME}")


class CheckpointReader:
    """Lazy, mmap-backed access to every tensor of one checkpoint by name (re-hashed first if it is olm's)."""

    def __init__(self, checkpoint: Path, stack: ExitStack, *, verify: bool = True) -> None:
        self.checkpoint = checkpoint
        self.where: dict[str, Any] = {}
        self.metadata: dict[str, str] = {}
        if verify and (checkpoint / MANIFEST_FILENAME).is_file():
            verify_checkpoint(checkpoint, deep=True)
        for path in weight_files(checkpoint):
            with loading_checkpoint(checkpoint, path.name):
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
                self.metadata.update(handle.metadata() or {})
                for key in handle.keys():
                    self.where[key] = handle

    def get(self, key: str) -> torch.Tensor:
        with loading_checkpoint(self.checkpoint, f"tensor {key!r}"):
            tensor: torch.Tensor = self.where[key].get_tensor(key)
        return tensor


class IncompatibleModelsError(OlmError):
    """The models to merge differ in architecture or tokenizer: averaging them means nothing."""

    exit_code = EXIT_USAGE


# config.json keys that say how a model was saved, not what it computes.
_CONFIG_BOOKKEEPING = frozenset({"transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache"})
# Tokenizer files that hold the vocabulary (tokenizer_config.json holds only options such as lengths).
_VOCABULARY_FILES = ("vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model")


def architecture(checkpoint: Path) -> dict[str, Any]:
    """``config.json`` without the keys that only record how it was saved."""
    try:
        config = json.loads((Path(checkpoint) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {checkpoint}: config.json is unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {checkpoint}: config.json is not a JSON object")
    return {k: v for k, v in config.items() if k not in _CONFIG_BOOKKEEPING}


def vocabulary_hash(checkpoint: Path) -> str | None:
    """sha256 of what maps text to ids (vocabulary, merges, added tokens, normalisation), or None
    when the directory has no tokenizer. ``tokenizer.json`` is hashed in canonical form, so two
    saves of one tokenizer by different library versions compare equal."""
    checkpoint = Path(checkpoint)
    digest = hashlib.sha256()
    tokenizer_json = checkpoint / "tokenizer.json"
    if tokenizer_json.is_file():
        try:
            state = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {checkpoint}: tokenizer.json is unreadable ({exc})") from None
        model = dict(state.get("model") or {})
        if isinstance(model.get("merges"), list):  # "a b" and ["a", "b"] are the same merge
            model["merges"] = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        added = sorted((t.get("id"), t.get("content"), bool(t.get("special"))) for t in state.get("added_tokens") or [])
        canonical = {"model": model, "added": added, "normalizer": state.get("normalizer"),
                     "pre_tokenizer": state.get("pre_tokenizer")}
        digest.update(json.dumps(canonical, sort_keys=True).encode("utf-8"))
        return digest.hexdigest()
    found = False
    for name in _VOCABULARY_FILES:
        path = checkpoint / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest() if found else None


def check_compatible(checkpoints: Sequence[Path]) -> None:
    """Refuse (exit 2) models whose architecture or tokenizer differs from the first one's."""
    first = Path(checkpoints[0])
    arch, vocab = architecture(first), vocabulary_hash(first)
    for other in checkpoints[1:]:
        other_arch = architecture(other)
        for key in sorted(set(arch) | set(other_arch)):
            if arch.get(key) != other_arch.get(key):
                raise IncompatibleModelsError(
                    f"{first} and {other} have different architectures: config {key} is "
                    f"{arch.get(key)!r} vs {other_arch.get(key)!r}")
        other_vocab = vocabulary_hash(other)
        if vocab != other_vocab:
            described = [v[:12] if v else "no tokenizer" for v in (vocab, other_vocab)]
            raise IncompatibleModelsError(
                f"{first} and {other} have different tokenizers (vocabulary hash {described[0]} vs {described[1]})")


@dataclass
class MergeInput:
    """One model to merge: a checkpoint directory, or the release a run directory serves."""

    given: Path  # as named on the command line
    checkpoint: Path  # the directory whose weights are read
    run: Path | None = None
    tokens: int | None = None  # tokens the run's ledger trained into this release (--weights tokens)

    def to_dict(self) -> dict[str, Any]:
        return {"given": str(self.given), "checkpoint": str(self.checkpoint),
                "run": str(self.run) if self.run else None, "tokens": self.tokens}


def is_run_directory(path: Path) -> bool:
    return (Path(path) / "recipe.yaml").is_file() and not (Path(path) / MANIFEST_FILENAME).is_file()


def resolve_input(path: Path, *, count_tokens: bool = False) -> MergeInput:
    """A run directory becomes its ``releases/latest``; anything else is a checkpoint directory."""
    path = Path(path)
    if not is_run_directory(path):
        if count_tokens:
            raise RecipeError(f"--weights tokens needs run directories (their ledgers count the tokens); "
                              f"{path} is not one (no recipe.yaml)")
        return MergeInput(path, path)
    from olm_cli.release import ReleaseStore

    release = ReleaseStore(path).latest_target()
    if release is None:
        raise CheckpointError(f"{path}: no release to merge (releases/latest is unset); train an increment first")
    tokens = release_tokens(path, release) if count_tokens else None
    return MergeInput(path, release, path, tokens)


def release_tokens(run: Path, release: Path) -> int:
    """The tokens of new data the run's shard ledger had trained when ``release`` was published.

    The ledger copy inside the release's source checkpoint is the exact one. When that checkpoint
    has been pruned, ``RUN/ledger.json`` serves if it is still at the release's increment (no
    later increment has checkpointed since); otherwise the count is unknowable and that is an
    error rather than a guess.
    """
    from olm_cli.release import ReleaseStore
    from olm_cli.run_state import TRAINER_STATE
    from olm_cli.rundir.ledger import LEDGER_FILENAME, ShardLedger

    info = ReleaseStore(run).info(release)
    increment = info.get("increment")
    checkpoint = Path(str(info.get("checkpoint", "")))
    checkpoint = checkpoint if checkpoint.is_absolute() else Path(run) / checkpoint
    ledger = ShardLedger(Path(run) / LEDGER_FILENAME)
    try:
        verify_checkpoint(checkpoint)
        state = json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))
        if isinstance(state, dict) and isinstance(state.get("ledger"), dict):
            ledger.load_state_dict(state["ledger"])
            return ledger.total_tokens
    except (CheckpointError, OSError, ValueError):
        pass  # pruned or unreadable: try the run's own view of the ledger
    view = ShardLedger.load(Path(run) / LEDGER_FILENAME)
    if view.increment == increment and len(view):
        return view.total_tokens
    raise CheckpointError(
        f"{run}: cannot tell how many tokens {release.name} was trained on (its checkpoint {checkpoint.name} "
        f"is gone and ledger.json has moved on to increment {view.increment}); pass --weights as numbers")


def merge_checkpoints(
    checkpoints: Sequence[Path], weights: Sequence[float] | None, out: Path,
    *, provenance: Sequence[dict[str, Any]] | None = None,
) -> Path:
    """Write sum_i w_i * theta_i (w normalised) to ``out`` as an HF checkpoint and return ``out``.

    Config and tokenizer files are copied from the first checkpoint. Every checkpoint must
    have exactly the same tensor names and shapes; the first difference is reported naming
    the checkpoint and the tensor. Non-floating tensors (integer buffers) are copied from the
    first checkpoint and must be equal everywhere; configs (but for how they were saved) and
    vocabularies must agree too (:func:`check_compatible`). ``out`` must not exist or be empty; the
    result is written to a temporary sibling and renamed into place (fsynced, with the umask's
    modes), so a failed merge leaves nothing behind.
    """
    if not checkpoints:
        raise CheckpointError("merge needs at least one checkpoint")
    paths = [Path(c) for c in checkpoints]
    ws = normalise_weights(weights, len(paths))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"output {out} already exists and is not empty")

    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers = [CheckpointReader(p, stack) for p in paths]
        first = readers[0]
        names = sorted(first.where)
        for reader in readers[1:]:
            extra = sorted(set(reader.where) - set(first.where))
            missing = sorted(set(first.where) - set(reader.where))
            if missing:
                raise CheckpointError(
                    f"checkpoint {reader.checkpoint} lacks tensor {missing[0]!r} "
                    f"present in {first.checkpoint}"
                    + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                )
            if extra:
                raise CheckpointError(
                    f"checkpoint {reader.checkpoint} has tensor {extra[0]!r} "
                    f"absent from {first.checkpoint}"
                    + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                )
        for name in names:
            base = first.get(name)
            if not base.is_floating_point():
                for reader in readers[1:]:
                    other = reader.get(name)
                    if other.shape != base.shape or not torch.equal(other, base):
                        raise CheckpointError(
                            f"non-float tensor {name!r} differs between {first.checkpoint} "
                            f"and {reader.checkpoint}; it cannot be averaged"
                        )
                merged[name] = base.clone()
                continue
            acc = base.to(torch.float32) * ws[0]
            for reader, w in zip(readers[1:], ws[1:], strict=True):
                tensor = reader.get(name)
                if tensor.shape != base.shape:
                    raise CheckpointError(
                        f"tensor {name!r} has shape {tuple(tensor.shape)} in {reader.checkpoint} "
                        f"but {tuple(base.shape)} in {first.checkpoint}"
                    )
                acc.add_(tensor.to(torch.float32), alpha=w)
            merged[name] = acc.to(base.dtype)
        metadata = dict(first.metadata)
    metadata.setdefault("format", "pt")
    check_compatible(paths)

    with publishing_directory(out) as staged:
        save_file(merged, str(staged / WEIGHTS_NAME), metadata=metadata)
        for side in SIDE_FILES:
            src = paths[0] / side
            if src.is_file():
                shutil.copy2(src, staged / side)
        (staged / "merge.json").write_text(
            json.dumps({"checkpoints": [str(p) for p in paths], "weights": ws,
                        **({"inputs": list(provenance)} if provenance else {})}, indent=2),
            encoding="utf-8",
        )
    return out


def average_weights(checkpoints: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The uniform average of ``checkpoints``' weights, in memory (``release.merge: sma``).

    Same rules as :func:`merge_checkpoints` (safetensors only, olm checkpoints re-hashed,
    float32 accumulation, each tensor back in its own dtype, integer buffers taken from the
    first), without writing anything: the caller loads the result into a model.
    """
    if not checkpoints:
        raise CheckpointError("averaging needs at least one checkpoint")
    paths = [Path(c) for c in checkpoints]
    averaged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        readers = [CheckpointReader(p, stack) for p in paths]
        names = sorted(readers[0].where)
        for reader in readers[1:]:
            if sorted(reader.where) != names:
                raise CheckpointError(f"checkpoints {paths[0].name} and {reader.checkpoint.name} hold different "
                                      "tensors; they cannot be averaged")
        for name in names:
            base = readers[0].get(name)
            if not base.is_floating_point():
                averaged[name] = base.clone()
                continue
            acc = base.to(torch.float32)
            for reader in readers[1:]:
                acc.add_(reader.get(name).to(torch.float32))
            averaged[name] = acc.div_(len(readers)).to(base.dtype)
    return averaged


def merge_runs(inputs: Sequence[Path], weights: Sequence[float] | None, out: Path, *,
               by_tokens: bool = False) -> dict[str, Any]:
    """``olm merge``: resolve run directories to their releases, weigh them, merge; returns the report.

    ``by_tokens`` weights every input by the tokens its run's ledger trained (FedAvg's n_k / n).
    """
    if not inputs:
        raise RecipeError("merge needs at least one model")
    resolved = [resolve_input(Path(p), count_tokens=by_tokens) for p in inputs]
    if by_tokens:
        counts = [float(r.tokens or 0) for r in resolved]
        if not any(counts):
            raise CheckpointError("--weights tokens: none of the runs has trained any tokens yet")
        weights = counts
    normalised = normalise_weights(weights, len(resolved))
    path = merge_checkpoints([r.checkpoint for r in resolved], normalised, out,
                             provenance=[r.to_dict() for r in resolved])
    return {"out": str(path), "weights": normalised, "inputs": [r.to_dict() for r in resolved]}
