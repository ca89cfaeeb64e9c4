"""Per-domain held-out loss and perplexity, the eval history, and a row of the matrix per increment.

Loss is token-weighted (total next-token NLL over all evaluated tokens of a domain divided by
their count), so domains and shards of different lengths compare fairly.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from olm_cli.data import read_blocks
from olm_cli.errors import OlmError
from olm_cli.evaluation.matrix import ContinualMatrix
from olm_cli.rundir.atomic import append_line_durable
from olm_cli.samples import Block, collate

MATRIX_FILE = Path("eval") / "matrix.json"
HISTORY_FILE = Path("eval") / "history.jsonl"


@torch.inference_mode()
def evaluate_domains(
    model: torch.nn.Module,
    tokenizer: Any,
    sets: dict[str, str],
    *,
    block_size: int,
    max_tokens: int,
    batch_size: int,
    text_field: str = "text",
) -> dict[str, dict[str, float]]:
    """Token-weighted loss, perplexity and token count for every domain in ``sets``."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    results: dict[str, dict[str, float]] = {}
    try:
        for name, path in sets.items():
            # Each block predicts one token fewer than it holds: read enough for max_tokens predictions.
            needed = max_tokens + math.ceil(max_tokens / (block_size - 1)) + 1
            blocks = exact_prefix(read_blocks(Path(path), tokenizer, block_size=block_size, max_tokens=needed,
                                              text_field=text_field, domain=name), max_tokens)
            nll, count = 0.0, 0
            for i in range(0, len(blocks), batch_size):
                batch = {k: v.to(device) for k, v in collate([b.tokens for b in blocks[i : i + batch_size]], pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
                labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.size(-1)), labels.reshape(-1),
                    ignore_index=-100, reduction="sum",
                )
                nll += float(loss)
                count += int((labels != -100).sum())
            if count == 0:
                raise OlmError(f"{path}: eval set {name!r} has no tokens")
            mean = nll / count
            results[name] = {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}
    finally:
        model.train(was_training)
    return results


def exact_prefix(blocks: list[Block], max_tokens: int) -> list[Block]:
    """The leading blocks holding exactly ``max_tokens`` predicted tokens (fewer only if the file is shorter).

    A block of n tokens predicts n - 1 of them; the last block kept is cut so the total is exact,
    which makes ``eval.max_tokens`` mean what it says and losses comparable across block sizes.
    """
    kept: list[Block] = []
    remaining = max_tokens
    for block in blocks:
        if remaining <= 0:
            break
        predicted = len(block.tokens) - 1
        if predicted <= 0:
            continue
        if predicted > remaining:
            block = Block(block.tokens[: remaining + 1], block.shard, block.domain)
            predicted = remaining
        kept.append(block)
        remaining -= predicted
    return kept


def record_increment_eval(
    run_dir: Path,
    recipe: Any,
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    increment: int,
    trained: dict[str, int],
    step: int,
    console: Any = None,
    trackers: Any = None,
) -> dict[str, dict[str, float]]:
    """Evaluate every domain and add row ``increment`` to the continual-learning matrix.

    ``trackers`` (:class:`olm_cli.trackers.Trackers`) get the row and the matrix's summary at ``step``.
    """
    results = evaluate_domains(model, tokenizer, recipe.eval.sets, block_size=recipe.data.block_size,
                               max_tokens=recipe.eval.max_tokens, batch_size=recipe.eval.batch_size,
                               text_field=recipe.data.text_field)
    trained_domain = max(trained, key=lambda d: trained[d]) if trained else None
    append_line_durable(run_dir / HISTORY_FILE, json.dumps({"increment": increment, "step": step, "trained": trained_domain,
                                                            "time": time.time(), "domains": results}))
    matrix_path = run_dir / MATRIX_FILE
    matrix = ContinualMatrix.from_json(matrix_path) if matrix_path.exists() else ContinualMatrix()
    label = "start" if increment == 0 else f"inc {increment}"
    # A re-run of the same increment's evaluation (e.g. after a crash) replaces its row.
    if label in matrix.row_labels:
        index = matrix.row_labels.index(label)
        for attr in ("rows", "row_labels", "trained_domain_per_row"):
            del getattr(matrix, attr)[index:]
    matrix.add_row(label, trained_domain, {name: r["loss"] for name, r in results.items()})
    matrix.save(matrix_path)
    if trackers is not None:
        trackers.log_eval(results, matrix.summary(), step)
    if console is not None:
        render_results(results, console, title=f"eval after {label}")
    return results


def render_results(results: dict[str, dict[str, float]], console: Any, title: str = "eval") -> None:
    from rich.table import Table

    table = Table(title=title)
    table.add_column("domain")
    table.add_column("loss", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("tokens", justify="right")
    for name, r in results.items():
        table.add_row(name, f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{int(r['tokens']):,}")
    console.print(table)
