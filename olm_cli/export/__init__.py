"""``olm export``: a run's model for deployment, as a GGUF file for llama.cpp or a smaller safetensors directory.

The source is what serving reads (``RUN/releases/latest``; the newest checkpoint that verifies
when the run publishes no releases) or any HF checkpoint directory. An olm checkpoint or release
is re-hashed against its manifest first, so flipped bytes are never exported. Tensors are read
one at a time from the safetensors files (never from pickles), optionally pruned by magnitude,
converted and written to a temporary file next to ``--out``, fsynced and renamed into place:
``--out`` appears complete or not at all, with the umask's permissions, and an existing file is
only replaced with ``--force``.

What a compression step costs is measured, not assumed: with ``--prune`` the held-out loss of
the source model is evaluated before and after pruning (the run's ``eval.sets``, or
``--eval-text``); ``--check`` loads the written file back with ``transformers`` (``gguf_file=``
for GGUF) and reports the largest logit difference from the model it was made from, and its
held-out loss.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from olm_cli.errors import CheckpointError, OlmError, RecipeError
from olm_cli.export.llama_gguf import (
    GGUF_TYPES,
    gguf_vocab,
    import_gguf,
    llama_shape,
    write_llama_gguf,
)
from olm_cli.export.pruning import PRUNE_SCOPES, Pruner
from olm_cli.rundir.atomic import publishing_directory, staged_file
from olm_cli.rundir.checkpoint import (
    MANIFEST_FILENAME,
    CheckpointFallback,
    CheckpointManager,
    verify_checkpoint,
)

FORMATS = ("gguf", "safetensors")
SAFETENSORS_DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPORT_INFO = "export.json"
_CHECK_TOKENS = 256  # tokens of held-out text whose logits --check compares
_FALLBACK_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 (a, b) = {c: d}; héllo ✓\n"


def resolve_source(run: Path | None, checkpoint: Path | None) -> tuple[Path, Any]:
    """The directory to export and, for ``--run``, the run's recipe.

    ``--run`` means what serving reads: ``releases/latest``, else (no release published) the
    newest checkpoint that verifies. Either is re-hashed; a plain HF directory is used as it is.
    """
    if (run is None) == (checkpoint is None):
        raise RecipeError("give exactly one of --run DIR or --checkpoint DIR")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_dir():
            raise OlmError(f"{checkpoint}: no such checkpoint directory")
        if (checkpoint / "recipe.yaml").is_file() and not (checkpoint / "config.json").is_file():
            raise RecipeError(f"--checkpoint {checkpoint} is a run directory; use --run {checkpoint}")
        if (checkpoint / MANIFEST_FILENAME).is_file():
            verify_checkpoint(checkpoint, deep=True)
        return checkpoint, None
    from olm_cli.recipe import load_recipe
    from olm_cli.release import ReleaseStore

    run = Path(run)  # type: ignore[arg-type]
    if not (run / "recipe.yaml").is_file():
        raise OlmError(f"{run}: not an olm run directory (no recipe.yaml)")
    recipe = load_recipe(run / "recipe.yaml", written_by_olm=True)
    release = ReleaseStore(run).latest_target()
    if release is not None:
        verify_checkpoint(release, deep=True)
        return release, recipe
    fallback = CheckpointFallback(CheckpointManager(run / "checkpoints"))
    chosen = fallback.choose(deep=True)
    if chosen is None:
        if fallback.rejected:
            raise fallback.none_usable()
        raise OlmError(f"{run}: nothing to export yet (no release and no complete checkpoint)")
    return chosen, recipe


def _refuse_existing(out: Path, fmt: str, force: bool) -> None:
    if fmt == "gguf" and out.is_dir():
        raise RecipeError(f"--out {out} is a directory; a GGUF export is one file (e.g. --out {out}/model.gguf)")
    empty_dir = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
    if os.path.lexists(out) and not force and not empty_dir:
        raise RecipeError(f"--out {out} already exists; pass --force to replace it")
    if out.is_dir() and not out.is_symlink() and force and any(out.iterdir()) and not (out / EXPORT_INFO).is_file():
        # --force replaces an earlier export, never an unrelated directory full of files
        raise RecipeError(f"--out {out} is a directory that olm export did not write; choose another path")


def _tensor_stream(reader: Any, transform: Callable[[str, torch.Tensor], torch.Tensor]
                   ) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    for name in sorted(reader.where):
        yield name, functools.partial(_transformed, reader, transform, name)


def _transformed(reader: Any, transform: Callable[[str, torch.Tensor], torch.Tensor], name: str) -> torch.Tensor:
    return transform(name, reader.get(name))


def export_model(
    *,
    run: Path | None,
    checkpoint: Path | None,
    out: Path,
    fmt: str = "gguf",
    quantize: str = "f16",
    dtype: str = "auto",
    prune: float = 0.0,
    prune_scope: str = "unstructured",
    eval_text: Path | None = None,
    max_tokens: int | None = None,
    check: bool = False,
    force: bool = False,
    say: Callable[[str], object] = lambda _message: None,
) -> dict[str, Any]:
    """Export one model; returns what ``--json`` prints (also the figures the human output shows)."""
    from olm_cli.merge import CheckpointReader

    started = time.monotonic()
    out = Path(out)
    if fmt not in FORMATS:
        raise RecipeError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "gguf" and quantize not in GGUF_TYPES:
        raise RecipeError(f"--quantize {quantize!r}: expected one of {', '.join(GGUF_TYPES)}")
    if fmt == "safetensors" and dtype not in SAFETENSORS_DTYPES:
        raise RecipeError(f"--dtype {dtype!r}: expected one of {', '.join(SAFETENSORS_DTYPES)}")
    if not 0.0 <= prune < 1.0:
        raise RecipeError(f"--prune {prune}: expected a fraction in [0, 1), e.g. 0.3")
    if prune_scope not in PRUNE_SCOPES:
        raise RecipeError(f"--prune-scope {prune_scope!r}: expected one of {', '.join(PRUNE_SCOPES)}")
    if eval_text is not None and not Path(eval_text).is_file():
        raise RecipeError(f"--eval-text {eval_text}: no such file")
    if fmt == "gguf":
        import_gguf()  # a missing extra is a usage error before any work
    _refuse_existing(out, fmt, force)
    if not out.parent.is_dir():
        raise RecipeError(f"--out {out}: directory {out.parent} does not exist")

    source, recipe = resolve_source(run, checkpoint)
    say(f"exporting {source}")
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its per-tensor loading bars would bury olm's own lines

    from olm_cli.modeling import load_tokenizer

    try:
        config = AutoConfig.from_pretrained(str(source))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source}: cannot read config.json ({exc})") from None
    shape = llama_shape(config, source) if fmt == "gguf" else None
    tokenizer = load_tokenizer(str(source))
    vocab = gguf_vocab(tokenizer, shape.vocab_size, source) if shape is not None else None

    sets, block_size, text_field, budget = _eval_setup(recipe, eval_text, max_tokens, config)
    if prune and not sets:
        raise RecipeError("--prune reports the loss it costs and needs held-out text: pass --eval-text FILE "
                          "(or --run with a recipe that has eval.sets)")
    result: dict[str, Any] = {"source": str(source), "out": str(out), "format": fmt}

    reference = None
    if prune or check:
        reference = _load_reference(source)
        if prune:
            say(f"measuring held-out loss before and after pruning {prune:.0%} ({prune_scope})")
            before = _losses(reference, tokenizer, sets, block_size, text_field, budget)
            Pruner(prune, prune_scope).prune_model(reference)
            after = _losses(reference, tokenizer, sets, block_size, text_field, budget)
            result["prune"] = {"loss_before": before, "loss_after": after,
                               "loss_delta": {k: after[k] - before[k] for k in before}}

    pruner = Pruner(prune, prune_scope) if prune else None

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        return pruner(name, tensor) if pruner is not None else tensor

    with ExitStack() as stack:
        reader = CheckpointReader(source, stack, verify=False)  # resolve_source has just re-hashed it
        try:
            if fmt == "gguf":
                assert shape is not None and vocab is not None
                say(f"writing {out} (GGUF, {quantize})")
                with staged_file(out, overwrite=force) as staged:
                    report = write_llama_gguf(staged, shape, vocab, _tensor_stream(reader, transform),
                                              quantize=quantize, name=_model_name(source))
                result.update({"quantize": quantize, "tensors": report.tensors, "tensor_types": report.types,
                               "f16_fallback": report.f16_fallback, "vocab": len(vocab.tokens),
                               "tokenizer_pre": vocab.pre})
            else:
                say(f"writing {out} (safetensors, {dtype})")
                written = _write_safetensors(source, out, reader, transform, dtype, result)
                result.update({"dtype": written})
        except FileExistsError:
            raise RecipeError(f"--out {out} appeared while exporting; pass --force to replace it") from None
        except OSError as exc:  # a full disk, a read-only directory: nothing was left at --out
            raise CheckpointError(f"could not write {out}: {exc.strerror or exc}") from None
    if pruner is not None:
        result.setdefault("prune", {}).update(pruner.report.to_dict())
    result["bytes"] = _size(out)
    result["source_bytes"] = _weights_size(source)
    if check:
        assert reference is not None
        say("checking: loading the exported model back with transformers")
        result["check"] = _check(out, fmt, reference, tokenizer, sets, block_size, text_field, budget)
    result["seconds"] = round(time.monotonic() - started, 2)
    return result


def _model_name(source: Path) -> str:
    """``general.name``: the run directory's name for a release or checkpoint, else the directory's."""
    parts = source.resolve().parts
    for marker in ("releases", "checkpoints"):
        if marker in parts[:-1]:
            index = len(parts) - 1 - parts[::-1].index(marker)
            if index >= 1:
                return f"{parts[index - 1]}-{source.resolve().name}"
    return source.resolve().name


def _eval_setup(recipe: Any, eval_text: Path | None, max_tokens: int | None, config: Any
                ) -> tuple[dict[str, str], int, str, int]:
    """Held-out sets (name -> file), block size, text field and token budget for loss measurements."""
    if eval_text is not None:
        sets = {Path(eval_text).stem: str(eval_text)}
    elif recipe is not None:
        sets = dict(recipe.eval.sets)
    else:
        sets = {}
    context = int(getattr(config, "max_position_embeddings", 256) or 256)
    block_size = min(recipe.data.block_size if recipe is not None else 256, context)
    budget = max_tokens or (recipe.eval.max_tokens if recipe is not None else 50_000)
    text_field = recipe.data.text_field if recipe is not None else "text"
    return sets, block_size, text_field, budget


def _load_reference(source: Path) -> torch.nn.Module:
    from olm_cli.modeling import load_pretrained
    from olm_cli.rundir.checkpoint import loading_checkpoint

    with loading_checkpoint(source, "the model"):
        model = load_pretrained(str(source), dtype="float32")
    return model.eval()


def _losses(model: torch.nn.Module, tokenizer: Any, sets: dict[str, str], block_size: int, text_field: str,
            budget: int) -> dict[str, float]:
    from olm_cli.evaluation.domains import evaluate_domains

    results = evaluate_domains(model, tokenizer, sets, block_size=block_size, max_tokens=budget, batch_size=8,
                               text_field=text_field)
    return {name: row["loss"] for name, row in results.items()}


def _write_safetensors(source: Path, out: Path, reader: Any, transform: Callable[[str, torch.Tensor], torch.Tensor],
                       dtype: str, result: dict[str, Any]) -> str:
    """A Hugging Face directory: weights in ``dtype``, config and tokenizer files from the source."""
    from safetensors.torch import save_file

    from olm_cli.merge import SIDE_FILES, WEIGHTS_NAME

    tensors: dict[str, torch.Tensor] = {}
    chosen: torch.dtype | None = None if dtype == "auto" else getattr(torch, dtype)
    for name in sorted(reader.where):
        tensor = transform(name, reader.get(name))
        if tensor.is_floating_point() and chosen is not None:
            tensor = tensor.to(chosen)
        tensors[name] = tensor.contiguous()
    stored = next((str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point()), "float32")
    with publishing_directory(out) as staged:
        save_file(tensors, str(staged / WEIGHTS_NAME), metadata={"format": "pt"})
        for side in SIDE_FILES:
            if (source / side).is_file():
                shutil.copy2(source / side, staged / side)
        config_path = staged / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        for key in ("dtype", "torch_dtype"):
            if key in config:
                config[key] = stored
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        info = {key: value for key, value in result.items() if key in ("source", "format")}
        (staged / EXPORT_INFO).write_text(json.dumps({**info, "dtype": stored}, indent=2) + "\n", encoding="utf-8")
    return stored


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _weights_size(source: Path) -> int:
    from olm_cli.merge import weight_files

    return sum(p.stat().st_size for p in weight_files(source))


def _sample_ids(tokenizer: Any, sets: dict[str, str], text_field: str, length: int) -> tuple[torch.Tensor, str]:
    """Token ids of held-out text (the first eval set's first block of ``length``), or of a fixed sentence."""
    from olm_cli.data import read_blocks

    for path in sets.values():
        blocks = read_blocks(Path(path), tokenizer, block_size=length, max_tokens=length, text_field=text_field)
        if blocks:
            ids = list(blocks[0].tokens)
            return torch.tensor([ids]), tokenizer.decode(ids)
    return torch.tensor([tokenizer(_FALLBACK_TEXT).input_ids]), _FALLBACK_TEXT


@torch.inference_mode()
def _check(out: Path, fmt: str, reference: torch.nn.Module, tokenizer: Any, sets: dict[str, str], block_size: int,
           text_field: str, budget: int) -> dict[str, Any]:
    """Load the written model (and, for GGUF, its tokenizer) back with transformers and compare."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    directory, loaded_tokenizer = out, None
    if fmt == "gguf":
        directory, kwargs["gguf_file"] = out.parent, out.name
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).eval()
        if fmt == "gguf":
            loaded_tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=out.name)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--check: transformers cannot load {out} ({str(exc).splitlines()[0]})") from None
    context = int(getattr(model.config, "max_position_embeddings", None) or _CHECK_TOKENS)
    ids, text = _sample_ids(tokenizer, sets, text_field, min(_CHECK_TOKENS, context))
    ids = ids[:, :context]
    expected = reference(input_ids=ids).logits.float()
    got = model(input_ids=ids).logits.float()
    check: dict[str, Any] = {
        "tokens": int(ids.shape[1]),
        "max_abs_logit_diff": float((got - expected).abs().max()),
        "same_argmax": float((got.argmax(-1) == expected.argmax(-1)).float().mean()),
    }
    if loaded_tokenizer is not None:
        check["tokenizer_matches"] = (loaded_tokenizer(text, add_special_tokens=True).input_ids
                                      == tokenizer(text, add_special_tokens=True).input_ids)
    if sets:
        check["loss"] = _losses(model, loaded_tokenizer or tokenizer, sets, block_size, text_field, budget)
        check["reference_loss"] = _losses(reference, tokenizer, sets, block_size, text_field, budget)
    return check


def _mib(size: int) -> str:
    return f"{size / 2**20:,.2f} MiB"


def render_export(result: dict[str, Any], console: Any) -> None:
    """The human summary: what was written, how big, and what compression cost in held-out loss."""
    from rich.table import Table

    kind = f"GGUF {result['quantize']}" if result["format"] == "gguf" else f"safetensors {result['dtype']}"
    console.print(f"wrote {result['out']} ({kind}, {_mib(result['bytes'])}; source weights "
                  f"{_mib(result['source_bytes'])}) in {result['seconds']:.1f} s", highlight=False)
    if result.get("f16_fallback"):
        console.print(f"{len(result['f16_fallback'])} matrices kept in f16 (rows not a multiple of 32): "
                      + ", ".join(result["f16_fallback"]), highlight=False)
    prune = result.get("prune")
    if prune:
        console.print(f"pruned {prune['zeroed']:,} weights in {prune['tensors']} matrices ({prune['scope']}): "
                      f"{prune['sparsity_of_pruned_tensors']:.1%} of those matrices, "
                      f"{prune['sparsity_of_model']:.1%} of all parameters", highlight=False)
    check = result.get("check") or {}
    if prune or check.get("loss"):
        table = Table(title="held-out loss")
        table.add_column("domain")
        columns: list[tuple[str, dict[str, float]]] = []
        if prune:
            columns += [("source", prune["loss_before"]), (f"pruned {prune['amount']:.0%}", prune["loss_after"])]
        if check.get("loss"):
            columns.append(("exported file", check["loss"]))
        for title, _ in columns:
            table.add_column(title, justify="right")
        if prune:
            table.add_column("Δ pruning", justify="right")
        for domain in columns[0][1]:
            row = [domain] + [f"{values[domain]:.4f}" for _, values in columns]
            if prune:
                row.append(f"{prune['loss_delta'][domain]:+.4f}")
            table.add_row(*row)
        console.print(table)
    if check:
        line = (f"check: transformers loads it; max |Δ logit| {check['max_abs_logit_diff']:.3g} over "
                f"{check['tokens']} tokens, same top-1 token on {check['same_argmax']:.1%}")
        if "tokenizer_matches" in check:
            line += "; tokenizer " + ("matches" if check["tokenizer_matches"] else "DIFFERS")
        console.print(line, highlight=False)
