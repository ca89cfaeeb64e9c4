"""Releases: what serving reads, written after every completed increment and moved only through a gate.

``RUN/checkpoints/`` is training state (optimizer, RNG, replay ...) and moves at every save, good
or bad. ``RUN/releases/`` is the product: model and tokenizer only, in ``release.dtype``, with a
model card, and ``RUN/releases/latest`` moves to a release only when it passes the gate:

1. every saved tensor is finite (checked on the tensors written, after the dtype cast, so a
   float16 overflow is caught too);
2. every domain of ``eval.sets`` was measured (when ``eval.after_increment`` is on; with no eval
   sets the check passes and the card says so);
3. the ``eval.gate.max_regression`` budgets hold against the previous release, the one
   ``latest`` points to (the first release has none and passes).

A release that fails the gate is still written, as ``release-NNNN/`` with ``"released": false``
and the reasons in ``release.json``, so it can be inspected or evaluated; ``latest`` stays where
it was. Every attempt, released or not, appends a line to ``releases/history.jsonl``.

Writes follow the checkpoint discipline (``olm_cli/rundir/checkpoint.py``): stage in
``.tmp-release-NNNN/``, describe every file in ``MANIFEST.json`` (same format as a checkpoint's),
fsync, rename, verify, and only then move ``latest`` with one atomic rename of a new symlink.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.markup import escape

from olm_cli.errors import CheckpointError
from olm_cli.recipe import GATE_ANY_DOMAIN, GateConfig, Recipe
from olm_cli.rundir.atomic import (
    append_line_durable,
    apply_umask,
    fsync_dir,
    fsync_tree,
    replace_symlink,
    write_bytes_atomic,
    write_json_atomic,
)
from olm_cli.rundir.checkpoint import (
    MANIFEST_FILENAME,
    MANIFEST_FORMAT,
    describe_files,
    format_bytes,
    is_no_space,
    verify_checkpoint,
    write_failure,
)
from olm_cli.rundir.ledger import now_iso

if TYPE_CHECKING:  # torch is imported where tensors are handled: `olm status` reads releases without it
    import torch
    from transformers import PreTrainedModel

RELEASES_DIR = "releases"
LATEST_LINK = "latest"
HISTORY_FILENAME = "history.jsonl"
RELEASE_INFO = "release.json"
MODEL_CARD = "README.md"
_NAME_RE = re.compile(r"^release-(\d{4,})$")
_TMP_PREFIX = ".tmp-release-"
_TRASH_PREFIX = ".trash-release-"
_LINK_TMP_PREFIX = f".{LATEST_LINK}.tmp-"  # replace_symlink's temporary link
_NAMED_TENSORS = 5  # non-finite tensors named in a reason; the gate details list them all

log = logging.getLogger(__name__)


def release_name(increment: int) -> str:
    return f"release-{increment:04d}"


def increment_of(path: Path) -> int:
    """The increment number encoded in a release directory's name."""
    match = _NAME_RE.match(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a release directory (release-NNNN)")
    return int(match.group(1))


@dataclass
class ReleaseResult:
    """What :func:`publish_release` did, for the engine's exit code and ``--json``."""

    released: bool  # releases/latest now points at this release
    path: Path | None  # the release directory written (kept with "released": false when the gate failed)
    reasons: list[str]  # why the gate failed (empty when released)
    gate: dict[str, Any]  # per-check details, as in release.json and history.jsonl
    increment: int = 0
    latest: str | None = None  # the release releases/latest points to after this call

    @property
    def message(self) -> str:
        """One line for the log: what was published, or why not and what is still served."""
        if self.released:
            return f"release {self.path.name if self.path else '?'} published → releases/latest"
        stays = f"releases/latest stays {self.latest}" if self.latest else "releases/latest stays unset (no release yet)"
        return f"increment {self.increment} trained but not released: {'; '.join(self.reasons)}; {stays}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "released": self.released,
            "path": str(self.path) if self.path else None,
            "reasons": list(self.reasons),
            "gate": self.gate,
            "increment": self.increment,
            "latest": self.latest,
        }


# --------------------------------------------------------------------------- the gate


@dataclass
class Baseline:
    """The release a new one is compared with: ``latest``'s target, or the newest released before it."""

    name: str
    eval: dict[str, dict[str, float]]


@dataclass
class GateVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], list[str]]:
    """Gate check 1: no NaN/Inf in any floating tensor that is about to be written."""
    import torch

    bad = [name for name, tensor in state_dict.items()
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    detail = {"passed": not bad, "tensors": len(state_dict), "non_finite": bad}
    if not bad:
        return detail, []
    named = ", ".join(bad[:_NAMED_TENSORS]) + (f" (+{len(bad) - _NAMED_TENSORS} more)" if len(bad) > _NAMED_TENSORS else "")
    return detail, [f"non-finite weights (NaN/Inf) in {named}"]


def check_measured(required: list[str], eval_results: Mapping[str, Any] | None) -> tuple[dict[str, Any], list[str]]:
    """Gate check 2: a release is never published on an eval that silently skipped a domain."""
    results = eval_results or {}
    missing = [name for name in required if not _finite_loss(results.get(name))]
    detail: dict[str, Any] = {"passed": not missing, "required": list(required), "missing": missing}
    if not required:
        detail["note"] = "no eval sets"
    if not missing:
        return detail, []
    return detail, [f"eval domain(s) not measured: {', '.join(missing)}"]


def check_budgets(
    gate: GateConfig, eval_results: Mapping[str, Mapping[str, float]] | None, baseline: Baseline | None
) -> tuple[dict[str, Any], list[str]]:
    """Gate check 3: each domain's loss may rise over the previous release's by at most its budget.

    A domain's budget is its own entry or else the ``*`` one; a domain with neither, or one the
    previous release did not measure (a new eval set), is reported and not gated.
    """
    detail: dict[str, Any] = {
        "passed": True,
        "configured": bool(gate.max_regression),
        "relative": gate.relative,
        "previous": baseline.name if baseline else None,
        "domains": {},
    }
    if not gate.max_regression:
        detail["note"] = "no budgets configured (eval.gate.max_regression)"
        return detail, []
    if baseline is None:
        detail["note"] = "first release: no previous release to compare with, budgets pass"
        return detail, []
    reasons: list[str] = []
    for name, result in (eval_results or {}).items():
        budget = gate.max_regression.get(name, gate.max_regression.get(GATE_ANY_DOMAIN))
        previous = baseline.eval.get(name)
        row: dict[str, Any] = {"loss": result.get("loss"), "budget": budget}
        if budget is None or math.isinf(budget):
            row.update(passed=True, note="no budget for this domain")
        elif not _finite_loss(previous) or not _finite_loss(result):
            row.update(passed=True, note=f"not measured by {baseline.name}" if not _finite_loss(previous) else "not measured")
        else:
            loss, before = float(result["loss"]), float(previous["loss"])  # type: ignore[index]
            allowed = budget * before if gate.relative else budget
            regression = loss - before
            row.update(previous=before, regression=regression, allowed=allowed, passed=regression <= allowed)
            if gate.relative and before > 0:
                row["relative_regression"] = regression / before
            if not row["passed"]:
                reasons.append(_budget_reason(name, loss, before, budget, baseline.name, relative=gate.relative))
        detail["domains"][name] = row
    detail["passed"] = not reasons
    return detail, reasons


def _budget_reason(name: str, loss: float, before: float, budget: float, baseline: str, *, relative: bool) -> str:
    if relative:
        change = f"+{(loss - before) / before:.1%}" if before > 0 else f"+{loss - before:.4f}"
        return f"{name} loss {loss:.4f} is {change} over {baseline} ({before:.4f}), budget {budget:.1%}"
    return f"{name} loss {loss:.4f} is +{loss - before:.4f} over {baseline} ({before:.4f}), budget {budget:g}"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (a NaN eval loss, an ``.inf`` budget) as null.

    release.json and history.jsonl are read by scripts; ``NaN``/``Infinity`` are not JSON.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def _number(value: Any) -> float:
    """A table cell's value; a missing or null one (a NaN stored as null) shows as nan."""
    return float(value) if value is not None else math.nan


def _finite_loss(result: Any) -> bool:
    try:
        return math.isfinite(float(result["loss"]))
    except (KeyError, TypeError, ValueError):
        return False


def run_gate(
    recipe: Recipe,
    state_dict: Mapping[str, torch.Tensor],
    eval_results: Mapping[str, Mapping[str, float]] | None,
    baseline: Baseline | None,
) -> GateVerdict:
    """All three checks; every failure is reported, not just the first."""
    required = list(recipe.eval.sets) if recipe.eval.after_increment else []
    checks: dict[str, Any] = {}
    reasons: list[str] = []
    for name, (detail, failed) in (
        ("finite", check_finite(state_dict)),
        ("measured", check_measured(required, eval_results)),
        ("budgets", check_budgets(recipe.eval.gate, eval_results, baseline)),
    ):
        checks[name] = detail
        reasons.extend(failed)
    if required == [] and recipe.eval.sets:
        checks["measured"]["note"] = "not evaluated (eval.after_increment: false)"
    return GateVerdict(not reasons, reasons, {"passed": not reasons, "previous": baseline.name if baseline else None,
                                              "checks": checks})


# --------------------------------------------------------------------------- the releases directory


class ReleaseStore:
    """Owns ``RUN/releases/``: atomic publish, ``latest``, the gate's baseline, keep-N pruning.

    Constructing one touches nothing on disk, so ``olm status`` can use it read-only.
    """

    def __init__(self, run_dir: Path, keep: int = 3) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.root = Path(run_dir) / RELEASES_DIR
        self.keep = keep

    # ------------------------------------------------------------------ reading

    def list(self) -> list[Path]:
        """Release directories (released, rejected or broken), oldest increment first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if _NAME_RE.match(p.name) and p.is_dir() and not p.is_symlink()]
        return sorted(found, key=increment_of)

    def latest_target(self) -> Path | None:
        """Where ``latest`` points, if that is a release directory that exists."""
        try:
            target = os.readlink(self.root / LATEST_LINK)
        except OSError:
            return None
        path = self.root / target
        return path if _NAME_RE.match(path.name) and path.is_dir() else None

    def verify(self, path: Path) -> None:
        """Raise :class:`CheckpointError` unless the release matches its manifest (sizes).

        A release's MANIFEST.json has the checkpoint format, so the checkpoint verifier applies.
        """
        verify_checkpoint(path)

    def info(self, path: Path) -> dict[str, Any]:
        """A release's ``release.json``; CheckpointError if it cannot be read."""
        try:
            value = json.loads((Path(path) / RELEASE_INFO).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: {RELEASE_INFO} is unreadable: {exc}") from None
        if not isinstance(value, dict):
            raise CheckpointError(f"{path}: {RELEASE_INFO} is malformed")
        return value

    def baseline(self, increment: int) -> Baseline | None:
        """The release a new release of ``increment`` is gated against.

        ``latest``'s target when it is older, verifies and was released; otherwise (first
        release, a broken ``latest``, or this very increment published before a crash) the
        newest older release that was.
        """
        target = self.latest_target()
        candidates = ([target] if target is not None else []) + list(reversed(self.list()))
        for path in candidates:
            if increment_of(path) >= increment:
                continue
            try:
                self.verify(path)
                info = self.info(path)
            except CheckpointError:
                continue
            if info.get("released") is True:
                return Baseline(path.name, dict(info.get("eval") or {}))
        return None

    # ------------------------------------------------------------------ writing

    def cleanup_temp(self) -> None:
        """Remove what an interrupted publish left; put back a release moved aside for replacement."""
        if not self.root.is_dir():
            return
        for child in sorted(self.root.iterdir()):
            if child.name.startswith(_TRASH_PREFIX):
                original = self.root / f"release-{child.name[len(_TRASH_PREFIX):]}"
                if not original.exists():
                    os.rename(child, original)
                    continue
            if child.name.startswith((_TMP_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(child, ignore_errors=True)
            elif child.name.startswith(_LINK_TMP_PREFIX):
                child.unlink(missing_ok=True)
        fsync_dir(self.root)

    def publish(self, staged: Path, name: str, *, move_latest: bool, fallback: str | None) -> Path:
        """Rename the complete ``staged`` directory to ``name`` and move ``latest`` if asked.

        Replacing a release that ``latest`` points to (re-publishing an increment after a crash)
        first points ``latest`` at ``fallback`` (the gate's baseline, or nothing), so serving
        never reads a directory while it is being swapped. On failure everything is put back.
        """
        final = self.root / name
        trash = self.root / f"{_TRASH_PREFIX}{name.removeprefix('release-')}"
        previous = self.latest_target()
        link_changed = trashed = published = False
        try:
            if final.exists():
                if previous == final:
                    self._set_latest(fallback)
                    link_changed = True
                if trash.exists():
                    shutil.rmtree(trash)
                os.rename(final, trash)
                trashed = True
            os.rename(staged, final)
            published = True
            fsync_dir(self.root)
            self.verify(final)
            if move_latest:
                self._set_latest(name)
                link_changed = True
                fsync_dir(self.root)
        except BaseException:
            with contextlib.suppress(OSError):
                if published:
                    shutil.rmtree(final, ignore_errors=True)
                if trashed:
                    os.rename(trash, final)
                if link_changed:
                    self._set_latest(previous.name if previous is not None else None)
            raise
        if trashed:
            shutil.rmtree(trash, ignore_errors=True)
        return final

    def _set_latest(self, name: str | None) -> None:
        """Swap ``latest`` to ``name`` (or remove it) in one rename so readers never see half a change."""
        replace_symlink(self.root / LATEST_LINK, name)

    def prune(self) -> builtins.list[Path]:  # ``list`` in this class is the method above
        """Keep the newest ``keep`` releases that verify (released or rejected) and ``latest``'s target.

        Rejected releases count: a run that keeps failing its gate must not fill the disk. A
        failure is logged, not raised; the new release is already safe.
        """
        target = self.latest_target()
        kept = 0
        removed = []
        for path in reversed(self.list()):
            if path == target:
                continue
            try:
                self.verify(path)
                if kept < self.keep:
                    kept += 1
                    continue
            except CheckpointError:
                pass  # broken: never worth keeping
            try:
                shutil.rmtree(path)
                removed.append(path)
            except OSError as exc:
                log.warning("could not remove old release %s: %s", path, exc)
        return removed

    def append_history(self, row: dict[str, Any]) -> None:
        """One fsynced line per publish attempt: the gate's record survives later pruning."""
        append_line_durable(self.root / HISTORY_FILENAME, json.dumps(row, sort_keys=True, allow_nan=False))


# --------------------------------------------------------------------------- publishing


def publish_release(
    run_dir: Path,
    recipe: Recipe,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    increment: int,
    step: int,
    checkpoint: Path,
    eval_results: dict[str, dict[str, float]] | None,
    tokens_trained: int | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    console: Any = None,
    origin: dict[str, Any] | None = None,
) -> ReleaseResult:
    """Write ``RUN/releases/release-NNNN`` from ``model`` and move ``latest`` to it if it passes the gate.

    Call it after the increment's checkpoint and eval (main process only). ``state_dict`` is the
    full state dict when the model is sharded (FSDP/DeepSpeed); otherwise the model's own is
    used, LoRA merged as for checkpoints. The training model is never modified. A write failure
    (a full disk) is a :class:`CheckpointError` and leaves ``latest`` and older releases alone;
    a failed gate is not an error: the result says ``released=False`` and why. ``origin`` (a
    cooldown branch, an average of trunk checkpoints) is written to release.json and the history.
    """
    import torch

    from olm_cli.partial import model_for_save

    run_dir = Path(run_dir)
    store = ReleaseStore(run_dir, keep=recipe.release.keep)
    name = release_name(increment)
    save_model = model_for_save(model)
    source = state_dict if state_dict is not None else save_model.state_dict()
    dtype = getattr(torch, recipe.release.dtype) if recipe.release.dtype != "auto" else _model_dtype(save_model)
    cast = cast_state_dict(source, dtype)

    store.root.mkdir(parents=True, exist_ok=True)
    store.cleanup_temp()
    baseline = store.baseline(increment)
    verdict = run_gate(recipe, cast, eval_results, baseline)
    info = strict_json({
        "release": name,
        "increment": increment,
        "step": step,
        "checkpoint": _relative_to(Path(checkpoint), run_dir),
        "tokens_trained": tokens_trained,
        "dtype": str(dtype).removeprefix("torch."),
        "created": now_iso(),
        "eval": eval_results or {},
        "previous": baseline.name if baseline else None,
        "released": verdict.passed,
        "reasons": verdict.reasons,
        "gate": verdict.details,
        **({"origin": origin} if origin else {}),
    })
    staged = store.root / f"{_TMP_PREFIX}{increment:04d}"
    try:
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir()
        _write_release_files(staged, recipe, save_model, cast, tokenizer, info, baseline)
        path = store.publish(staged, name, move_latest=verdict.passed, fallback=baseline.name if baseline else None)
    except BaseException as exc:
        shutil.rmtree(staged, ignore_errors=True)
        failure = write_failure(exc)
        if failure is None:
            raise  # a bug or Ctrl-C: not a write failure to explain
        if is_no_space(exc):
            with contextlib.suppress(OSError):
                failure += f" ({format_bytes(shutil.disk_usage(store.root).free)} free on {store.root})"
        raise CheckpointError(f"could not write release {name}: {failure}") from exc
    latest = store.latest_target()
    store.append_history({key: info[key] for key in ("release", "increment", "step", "released", "reasons", "gate",
                                                     "created", "previous", "origin") if key in info}
                         | {"latest": latest.name if latest else None})
    store.prune()
    result = ReleaseResult(verdict.passed, path, verdict.reasons, info["gate"], increment,
                           latest.name if latest else None)
    if console is not None:
        console.print(escape(result.message), style=None if result.released else "yellow", highlight=False)
    return result


def cast_state_dict(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A copy of the floating tensors in ``dtype`` (others as they are), detached and on the CPU.

    Tensors that share storage (tied embeddings) stay shared, so ``save_pretrained`` still
    recognises them as tied and writes one copy.
    """
    cast: dict[str, torch.Tensor] = {}
    by_storage: dict[tuple[int, torch.dtype, tuple[int, ...], int], torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        if not tensor.is_floating_point():
            cast[key] = tensor.cpu()
            continue
        identity = (tensor.untyped_storage().data_ptr(), tensor.dtype, tuple(tensor.shape), int(tensor.storage_offset()))
        if identity not in by_storage:
            by_storage[identity] = tensor.to(device="cpu", dtype=dtype, copy=True)
        cast[key] = by_storage[identity]
    return cast


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _relative_to(path: Path, base: Path) -> str:
    """A path inside the run directory is stored relative to it: the run directory can move."""
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)


def _write_release_files(
    directory: Path,
    recipe: Recipe,
    save_model: PreTrainedModel,
    cast: dict[str, torch.Tensor],
    tokenizer: Any,
    info: dict[str, Any],
    baseline: Baseline | None,
) -> None:
    """Everything a release holds, then its manifest, all fsynced (the caller renames it into place)."""
    from olm_cli.modeling import save_tokenizer

    save_model.save_pretrained(directory, state_dict=cast, safe_serialization=True)
    _set_config_dtype(directory / "config.json", info["dtype"])
    save_tokenizer(tokenizer, directory)  # after config.json: it takes model_max_length from there
    write_json_atomic(directory / RELEASE_INFO, info)
    write_bytes_atomic(directory / MODEL_CARD, model_card(recipe, info, baseline).encode("utf-8"))
    apply_umask(directory)  # safetensors writes 0600; a serving user must be able to read a release
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": info["step"],
        "created": info["created"],
        "metadata": {"release": info["release"], "increment": info["increment"], "released": info["released"]},
        "files": describe_files(directory),
    }
    write_json_atomic(directory / MANIFEST_FILENAME, manifest)
    fsync_tree(directory)


def _set_config_dtype(config_path: Path, dtype: str) -> None:
    """``save_pretrained`` records the in-memory model's dtype; the weights written are ``dtype``."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for key in ("dtype", "torch_dtype"):
        if key in config:
            config[key] = dtype
    write_json_atomic(config_path, config)


# --------------------------------------------------------------------------- model card


def model_card(recipe: Recipe, info: dict[str, Any], baseline: Baseline | None) -> str:
    """README.md of a release: Hugging Face front matter, provenance, eval table, gate verdict."""
    front: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "text-generation",
                             "tags": ["olm", "continual-learning"]}
    if recipe.model.init == "pretrained" and recipe.model.name_or_path:
        front["base_model"] = recipe.model.name_or_path
    front["olm"] = {key: info[key] for key in ("release", "increment", "step", "released")}
    verdict = "passed" if info["released"] else "**failed**: " + "; ".join(info["reasons"])
    tokens = f"{info['tokens_trained']:,}" if info["tokens_trained"] is not None else "unknown"
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
        f"# {info['release']}", "",
        f"Model and tokenizer after increment {info['increment']} of an olm continual-learning run.",
        "Load it with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` on this directory",
        "(or on `releases/latest`, which points at the newest release that passed the gate).", "",
        "| | |", "|---|---|",
        f"| increment | {info['increment']} |",
        f"| optimizer step | {info['step']} |",
        f"| tokens trained (whole run) | {tokens} |",
        f"| source checkpoint | `{info['checkpoint']}` |",
        f"| dtype | {info['dtype']} |",
        f"| created | {info['created']} |",
        f"| compared with | {baseline.name if baseline else 'none (first release)'} |",
        f"| gate | {verdict} |", "",
        "## Evaluation", "",
    ]
    lines += _eval_table(recipe, info["eval"], baseline)
    lines += ["", "## Gate", ""]
    checks = info["gate"]["checks"]
    finite = checks["finite"]
    lines.append(f"- finite weights: {'passed' if finite['passed'] else 'failed'} ({finite['tensors']} tensors checked)")
    measured = checks["measured"]
    lines.append(f"- every eval domain measured: {'passed' if measured['passed'] else 'failed'}"
                 + (f" ({measured['note']})" if measured.get("note") else "")
                 + (f"; missing: {', '.join(measured['missing'])}" if measured["missing"] else ""))
    budgets = checks["budgets"]
    lines.append(f"- loss budgets: {'passed' if budgets['passed'] else 'failed'}"
                 + (f" ({budgets['note']})" if budgets.get("note") else ""))
    for domain, row in budgets["domains"].items():
        if "regression" in row:
            lines.append(f"  - {domain}: {row['regression']:+.4f} (allowed {row['allowed']:.4f}): "
                         f"{'ok' if row['passed'] else 'over budget'}")
        else:
            lines.append(f"  - {domain}: {row.get('note', '')}")
    return "\n".join(lines) + "\n"


def _eval_table(recipe: Recipe, results: Mapping[str, Mapping[str, float]], baseline: Baseline | None) -> list[str]:
    if not recipe.eval.sets and not results:
        return ["No eval sets (`eval.sets` is empty): nothing was measured."]
    if not results:
        return ["Not evaluated (`eval.after_increment: false`)." if not recipe.eval.after_increment
                else "No eval results."]
    delta_header = f"Δ loss vs {baseline.name}" if baseline else "Δ loss"
    lines = [f"| domain | loss | perplexity | tokens | {delta_header} |", "|---|---:|---:|---:|---:|"]
    for domain, result in results.items():
        previous = baseline.eval.get(domain) if baseline else None
        if _finite_loss(previous) and _finite_loss(result):
            before = float(previous["loss"])  # type: ignore[index]
            delta = float(result["loss"]) - before
            change = f"{delta:+.4f}" + (f" ({delta / before:+.1%})" if before > 0 else "")
        else:
            change = "n/a"
        loss = _number(result.get("loss"))
        perplexity = _number(result.get("perplexity"))
        tokens = f"{int(result['tokens']):,}" if "tokens" in result else "?"
        lines.append(f"| {domain} | {loss:.4f} | {perplexity:.2f} | {tokens} | {change} |")
    return lines


# --------------------------------------------------------------------------- status


def release_status(run_dir: Path) -> dict[str, Any]:
    """``olm status``'s view of releases: what serving reads, and the last gate verdict."""
    store = ReleaseStore(run_dir)
    problems: list[str] = []
    current = None
    link = store.root / LATEST_LINK
    target = store.latest_target()
    if target is None and link.is_symlink():
        problems.append(f"releases/latest points to missing {os.readlink(link)}")
    elif target is not None:
        try:
            store.verify(target)
            info = store.info(target)
            current = {
                "name": target.name,
                "increment": info.get("increment"),
                "step": info.get("step"),
                "dtype": info.get("dtype"),
                "created": info.get("created"),
                "path": str(target.resolve()),
            }
        except CheckpointError as exc:
            problems.append(f"releases/latest is unusable: {exc}")
    from olm_cli.rundir.status import last_json_line

    return {"release": current, "last_gate": last_json_line(store.root / HISTORY_FILENAME), "problems": problems}
