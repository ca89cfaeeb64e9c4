"""Issue 9, "never fail silently", for training: every fault ends in one ``error:`` line and a
documented exit code, nothing is lost (every checkpoint loads and is finite, the ledger matches
the latest checkpoint), nothing hangs, and the slow or surprising phases say what they do.

Most runs go through the real entry point in-process (:func:`e2e_helpers.cli`); a signal needs a
real child process (:func:`e2e_helpers.spawn`), always reaped with a timeout.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_documents
from e2e_helpers import (
    Result,
    add_shard,
    cli,
    last_step,
    latest,
    ledger_summary,
    make_recipe,
    reaped,
    spawn,
    trainer_state,
    wait_for,
    weights,
)

from olm_cli import engine
from olm_cli.errors import EXIT_FAILURE, EXIT_OK, EXIT_SIGTERM
from olm_cli.rundir import CheckpointManager
from olm_cli.state_files import load_tree

# End to end (every test trains through the CLI): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

DOCS = 8  # a shard of 8 documents is about four steps of batch 4
DIVERGED = re.compile(
    r"error: loss or gradients were NaN/Inf for (\d+) consecutive steps; "
    r"rolled back to (step-\d{8}) \(verified finite\)\. Lower optim\.lr or check the data"
)
PROGRESS = re.compile(r"increment (\d+) step (\d+)/(\d+) loss \S+ lr (\S+) ([\d,]+) tok/s ETA")


# --------------------------------------------------------------------------- helpers


def train(recipe: Path, *overrides: str) -> Result:
    return cli("train", "--config", recipe, *overrides)


def error_line(result: Result) -> str:
    """The one ``error:`` line of a failed run; a traceback or a second error is a failure."""
    assert "Traceback" not in result.text, result.text
    errors = [line for line in result.text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.text
    return errors[0]


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of ``metrics.jsonl``, parsed as strict JSON (NaN, Infinity are refused)."""

    def refuse(constant: str) -> Any:
        raise AssertionError(f"metrics.jsonl holds the non-JSON constant {constant}")

    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def assert_nothing_lost(run_dir: Path) -> Path:
    """Every checkpoint verifies and holds finite weights; ``ledger.json`` matches the latest one.

    Returns the latest checkpoint.
    """
    manager = CheckpointManager(run_dir / "checkpoints")
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    assert checkpoints, "no checkpoint at all"
    for checkpoint in checkpoints:
        manager.verify(checkpoint, deep=True)
        bad = [name for name, tensor in weights(checkpoint).items() if not torch.isfinite(tensor).all()]
        assert not bad, f"{checkpoint.name} holds non-finite tensors: {bad[:3]}"
    newest = latest(run_dir)
    assert newest in checkpoints
    # ledger.json agrees with the ledger captured with the weights; it may also list shards found
    # since (pending, untrained), never one trained past the checkpoint.
    on_disk = {e["path"]: e for e in json.loads((run_dir / "ledger.json").read_text(encoding="utf-8"))["shards"]}
    captured = {e["path"]: e for e in trainer_state(newest)["ledger"]["shards"]}
    for path, entry in on_disk.items():
        if path in captured:
            assert entry == captured[path], f"ledger.json and {newest.name} disagree on {path}"
        else:
            assert (entry["status"], entry["tokens"]) == ("pending", 0), entry
    assert captured.keys() <= on_disk.keys()
    return newest


def write_body_shard(path: Path, domain: str, index: int, docs: int = DOCS) -> Path:
    """A shard whose records keep their text under ``body`` (and carry another string field)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for n, text in enumerate(make_documents(domain, docs, index)):
            handle.write(json.dumps({"id": f"{domain}-{index}-{n}", "body": text}) + "\n")
    return path


def increment_rows(run_dir: Path, increment: int) -> list[dict[str, Any]]:
    return [row for row in metric_rows(run_dir) if row["increment"] == increment and not row.get("skipped")]


# --------------------------------------------------------------------------- 1, 2: NaN/Inf


@pytest.mark.parametrize("checkpoint_every", [5, 2])
def test_nan_gradient_is_never_applied_and_every_night_fails_loudly(tmp_path: Path, checkpoint_every: int) -> None:
    """lr 1e30: the first step has a finite gradient (the weights jump to ~1e29), every later step
    a finite loss and a NaN gradient norm. The new shard is short: its data runs out before
    ``run.max_bad_steps`` is reached, which must not complete the increment on the 1e29 weights."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, run={"checkpoint_every": checkpoint_every})
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK
    good = latest(run_dir)
    add_shard(tmp_path / "stream", "alpha", 1, docs=DOCS)

    for night in (1, 2):  # the same cron line, two nights in a row
        result = train(recipe, "optim.lr=1e30")

        assert result.code == EXIT_FAILURE, f"night {night}: {result.text}"
        assert "nothing to do" not in result.text
        assert "non-finite gradient norm (nan)" in result.text, result.text
        match = DIVERGED.fullmatch(error_line(result))
        assert match, result.text
        assert int(match.group(1)) == result.text.count("batch skipped")
        assert match.group(2) == good.name
        assert latest(run_dir) == good
        assert assert_nothing_lost(run_dir) == good
        assert ledger_summary(run_dir)["00-alpha/shard-001.jsonl"][:2] == ("pending", 0)


def test_a_stop_signal_during_a_nan_streak_does_not_checkpoint_the_diverged_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM (as the time budget) used to checkpoint the weights behind the skipped batches: they
    became ``latest`` and the rollback target, and every later night failed even at a sane lr."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK
    good = latest(run_dir)
    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)
    real_skip = engine.Trainer._skip_batch

    def skip_then_sigterm(self: engine.Trainer, *args: Any, **kwargs: Any) -> None:
        real_skip(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's GracefulStop

    monkeypatch.setattr(engine.Trainer, "_skip_batch", skip_then_sigterm)
    result = train(recipe, "optim.lr=1e30")
    monkeypatch.undo()

    assert result.code == EXIT_FAILURE, result.text
    match = DIVERGED.fullmatch(error_line(result))
    assert match and match.groups() == ("1", good.name), result.text
    assert assert_nothing_lost(run_dir) == good
    # The next night, at the recipe's own lr, trains the increment from the good checkpoint.
    assert train(recipe).code == EXIT_OK
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}
    assert_nothing_lost(run_dir)


def test_a_lower_lr_recovers_when_a_checkpoint_landed_on_the_diverging_update(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, run={"checkpoint_every": 1})
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK
    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)
    good = latest(run_dir)
    # Step 1 at lr 1e30 has a finite gradient and is checkpointed (weights ~1e29, finite).
    failed = train(recipe, "optim.lr=1e30")
    assert failed.code == EXIT_FAILURE, failed.text
    assert failed.has(f"rolled back to {good.name} (verified finite;"), failed.text
    assert failed.has("holds the weights that diverged and is no longer latest"), failed.text
    assert latest(run_dir) == good

    result = train(recipe)  # the advice: "Lower optim.lr"

    assert result.code == EXIT_OK, result.text
    assert_nothing_lost(run_dir)


def test_metrics_stay_strict_json_when_gradients_are_nan(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK
    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)  # long enough to reach run.max_bad_steps

    result = train(recipe, "optim.lr=1e30", "run.max_bad_steps=3")

    assert result.code == EXIT_FAILURE, result.text
    assert DIVERGED.fullmatch(error_line(result)), result.text
    rows = metric_rows(run_dir)
    skipped = [row for row in rows if row.get("skipped")]
    assert len(skipped) == 3 == result.text.count("batch skipped")
    for row in skipped:
        assert row["skipped"] is True and row["increment"] == 2
        assert row["nonfinite"] == ["grad_norm"] and row["grad_norm"] is None
        assert isinstance(row["loss"], float) and math.isfinite(row["loss"])  # a finite loss, a NaN gradient
        assert "nan" in row["reason"]
    trained = [row for row in rows if not row.get("skipped")]
    assert all("nonfinite" not in row and math.isfinite(row["grad_norm"]) for row in trained)


def test_one_infinite_loss_is_skipped_logged_as_null_and_training_goes_on(tmp_path: Path, monkeypatch) -> None:
    """A single bad batch is dropped (not stepped on), logged as strict JSON, and the run completes."""
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    run_dir = tmp_path / "run"
    real_loss = engine.per_sample_loss
    calls = 0

    def infinite_second_batch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        row_loss, other = real_loss(*args, **kwargs)
        return (row_loss * math.inf if calls == 2 else row_loss), other

    monkeypatch.setattr(engine, "per_sample_loss", infinite_second_batch)
    result = train(recipe)

    assert result.code == EXIT_OK, result.text
    assert "non-finite loss (inf) at step 2; batch skipped (1/5)" in result.text
    skipped = [row for row in metric_rows(run_dir) if row.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["loss"] is None and skipped[0]["nonfinite"] == ["loss"]
    assert assert_nothing_lost(run_dir).name == f"step-{last_step(run_dir):08d}"


# --------------------------------------------------------------------------- 3: NaN weights


POISONED = "model.layers.1.mlp.down_proj.weight"


def poison_after(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Optimizer steps whose ``step``-th update writes NaN into ``POISONED`` (gradients stay finite)."""
    real_build = engine.build_optimizer

    def build(model: torch.nn.Module, recipe: Any) -> torch.optim.Optimizer:
        optimizer = real_build(model, recipe)
        target = dict(model.named_parameters())[POISONED]
        real_step: Callable[..., Any] = optimizer.step
        calls = 0

        def step(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            out = real_step(*args, **kwargs)
            calls += 1
            if calls == step_number:
                with torch.no_grad():
                    target.view(-1)[0] = float("nan")
            return out

        optimizer.step = step  # type: ignore[method-assign]
        return optimizer

    step_number = step
    monkeypatch.setattr(engine, "build_optimizer", build)


def test_nan_weights_are_never_checkpointed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, run={"checkpoint_every": 2})
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK
    good = latest(run_dir)
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)

    poison_after(2, monkeypatch)  # the update just before the increment's first checkpoint
    result = train(recipe)

    assert result.code == EXIT_FAILURE, result.text
    step = int(good.name.removeprefix("step-")) + 2
    assert error_line(result) == (
        f"error: 1 parameter tensor(s) became NaN/Inf by step {step} (first: {POISONED}); "
        f"not checkpointed, latest stays {good.name} (verified finite). Lower optim.lr or check the data"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    assert assert_nothing_lost(run_dir) == good
    assert ledger_summary(run_dir)["01-beta/shard-000.jsonl"][:2] == ("pending", 0)


def test_nan_weights_in_the_first_increment_leave_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, run={"checkpoint_every": 1})
    run_dir = tmp_path / "run"
    poison_after(1, monkeypatch)

    result = train(recipe)

    assert result.code == EXIT_FAILURE, result.text
    assert error_line(result).endswith(f"(first: {POISONED}); not checkpointed, no checkpoint was written. "
                                       "Lower optim.lr or check the data"), result.text
    assert not CheckpointManager(run_dir / "checkpoints").list()
    monkeypatch.undo()
    assert train(recipe).code == EXIT_OK  # the next night starts the increment afresh
    assert_nothing_lost(run_dir)


# --------------------------------------------------------------------------- 4: replay, batch 1


def test_replay_ratio_is_honoured_with_one_sample_per_step(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS,
                         batch={"size": 1, "micro_batch": 1},
                         replay={"policy": "reservoir", "ratio": 0.25, "capacity": 64},
                         run={"checkpoint_every": 1000})
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK  # fills the buffer
    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)

    assert train(recipe).code == EXIT_OK

    rows = increment_rows(run_dir, 2)
    assert len(rows) >= 40, len(rows)
    replay_steps = sum(row["replayed"] for row in rows)
    assert {row["batch_size"] for row in rows} == {1}
    assert 0.1 <= replay_steps / len(rows) <= 0.4, (replay_steps, len(rows))
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}
    assert_nothing_lost(run_dir)


# --------------------------------------------------------------------------- 5: budget > data


def test_step_budget_beyond_the_data_is_reported_and_the_schedule_ends_at_its_floor(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS,
                         run={"max_steps": 1000}, optim={"lr": 1e-3, "min_lr_ratio": 0.1, "warmup_steps": 1})
    run_dir = tmp_path / "run"

    result = train(recipe)

    assert result.code == EXIT_OK, result.text
    rows = increment_rows(run_dir, 1)
    warning = [line for line in result.text.splitlines() if "run.max_steps=1000" in line]
    assert len(warning) == 1, result.text
    assert warning[0].startswith("warning: run.max_steps=1000 is more than this increment's data holds")
    assert warning[0].endswith(f"the schedule is planned on {len(rows)} steps"), (warning, len(rows))
    assert rows[-1]["lr"] == pytest.approx(1e-3 * 0.1, rel=1e-3)
    assert f"step {len(rows)}/{len(rows)}" in result.text
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}
    assert_nothing_lost(run_dir)


# --------------------------------------------------------------------------- 6, 11: evaluation


def eval_recipe(tmp_path: Path, **sections: dict[str, Any]) -> Path:
    """A scratch run with two held-out sets far longer than the token budget."""
    from conftest import write_jsonl

    sets = {domain: str(write_jsonl(tmp_path / "eval" / f"{domain}.jsonl", make_documents(domain, 40, 99)))
            for domain in ("alpha", "beta")}
    return make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, eval={"sets": sets, **sections.pop("eval", {})},
                       **sections)


def test_eval_max_tokens_is_exact(tmp_path: Path) -> None:
    # The tiny model's max_position_embeddings is 128: blocks of 128 tokens, eval budget 3 blocks.
    recipe = eval_recipe(tmp_path, eval={"max_tokens": 384}, data={"block_size": 128})
    run_dir = tmp_path / "run"
    assert train(recipe).code == EXIT_OK

    result = cli("eval", "--run", run_dir, "--json")

    assert result.code == EXIT_OK, result.text
    domains = result.json()["domains"]
    assert {name: values["tokens"] for name, values in domains.items()} == {"alpha": 384, "beta": 384}
    history = [json.loads(line) for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    assert [row["increment"] for row in history] == [0, 1]
    assert all(values["tokens"] == 384 for row in history for values in row["domains"].values())


def test_slow_phases_announce_themselves_before_training(tmp_path: Path) -> None:
    recipe = eval_recipe(tmp_path)

    result = train(recipe)

    assert result.code == EXIT_OK, result.text
    lines = result.text.splitlines()

    def first(prefix: str) -> int:
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        assert found, f"no line starting {prefix!r} in:\n{result.text}"
        return found[0]

    tokenizer = first("training a 320-token byte-level BPE tokenizer on the first")
    row_zero = first("evaluating the starting model on 2 domain(s) (row 0 of the matrix)")
    training = first("increment 1 step 1/")
    assert tokenizer < row_zero < training, result.text
    assert first("evaluating 2 domain(s) after increment 1") > training


# --------------------------------------------------------------------------- 7: LwF from scratch


def test_lwf_is_off_on_a_random_start_and_on_from_the_second_increment(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, distill={"method": "lwf", "alpha": 0.5})
    run_dir = tmp_path / "run"
    note = "note: distill.method lwf is off in increment 1: the model starts from a random initialisation"

    first = train(recipe)
    assert first.code == EXIT_OK, first.text
    assert first.text.count(note) == 1
    assert increment_rows(run_dir, 1), "increment 1 did not train"
    assert not (run_dir / "increment-start").exists()  # no teacher was kept

    add_shard(tmp_path / "stream", "beta", 0, docs=DOCS)
    second = train(recipe)
    assert second.code == EXIT_OK, second.text
    assert note not in second.text
    # The teacher of increment 2 is the model it started from, kept for resumes.
    assert json.loads((run_dir / "increment-start" / "increment.json").read_text()) == {"increment": 2}
    assert_nothing_lost(run_dir)


# --------------------------------------------------------------------------- 8: text_field


def test_ewc_reads_the_recipes_text_field(tmp_path: Path) -> None:
    stream = tmp_path / "stream"
    write_body_shard(stream / "00-alpha" / "shard-000.jsonl", "alpha", 0)
    recipe = make_recipe(tmp_path, shards=[], data={"text_field": "body"},
                         regularize={"method": "ewc", "strength": 1.0, "fisher_batches": 2})
    run_dir = tmp_path / "run"

    for increment, (domain, index) in enumerate([("alpha", 0), ("beta", 1)], start=1):
        if increment > 1:
            write_body_shard(stream / f"01-{domain}" / f"shard-{index:03d}.jsonl", domain, index)
        result = train(recipe)
        assert result.code == EXIT_OK, result.text
        assert f"increment {increment} complete" in result.text
        checkpoint = assert_nothing_lost(run_dir)
        assert trainer_state(checkpoint)["increment"] == increment
        assert trainer_state(checkpoint)["increment_complete"] is True
        regularizer = load_tree(checkpoint / "parts")["regularizer"]
        assert regularizer["estimates"] == increment and regularizer["fisher"]  # the Fisher pass ran
    assert {status for status, _, _ in ledger_summary(run_dir).values()} == {"done"}


def test_replay_seed_files_are_read_with_the_recipes_text_field(tmp_path: Path) -> None:
    write_body_shard(tmp_path / "stream" / "00-alpha" / "shard-000.jsonl", "alpha", 0)
    seed = write_body_shard(tmp_path / "old" / "gamma.jsonl", "gamma", 7, docs=16)
    recipe = make_recipe(tmp_path, shards=[], data={"text_field": "body"},
                         replay={"policy": "reservoir", "ratio": 0.25, "capacity": 64,
                                 "seed_from": [str(seed)], "seed_samples": 16})
    run_dir = tmp_path / "run"

    result = train(recipe)

    assert result.code == EXIT_OK, result.text
    assert "replay buffer warm-started with 16 blocks from replay.seed_from" in result.text
    assert sum(row["replayed"] for row in increment_rows(run_dir, 1)) > 0
    assert_nothing_lost(run_dir)


# --------------------------------------------------------------------------- 9: resume after SIGTERM


def test_resume_after_sigterm_names_its_checkpoint_and_reports_an_honest_rate(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("alpha", 1), ("beta", 0)], docs=24,
                         run={"checkpoint_every": 1000})
    run_dir = tmp_path / "run"
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "train.log")) as proc:
        wait_for(lambda: last_step(run_dir) >= 20, proc, timeout=120, what="step 20")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    stopped_output = (tmp_path / "train.log").read_text()
    assert proc.returncode == EXIT_SIGTERM, stopped_output
    stopped = trainer_state(assert_nothing_lost(run_dir))
    resumed_at = stopped["step"]
    assert stopped["increment_complete"] is False and resumed_at >= 20

    result = train(recipe)

    assert result.code == EXIT_OK, result.text
    assert f"resuming increment 1 at step {resumed_at} from step-{resumed_at:08d}" in result.text
    progress = [PROGRESS.search(line) for line in result.text.splitlines()]
    first = next(match for match in progress if match)
    step, rate = int(first.group(2)), int(first.group(5).replace(",", ""))
    assert step > resumed_at
    # The loop's clock covers at least the steps it timed, so an honest rate over the steps since
    # the resume is at most their tokens over their summed step times. Counting the tokens trained
    # before the resume (about resumed_at / (step - resumed_at) times more) breaks this bound.
    rows = {row["step"]: row for row in increment_rows(run_dir, 1)}
    since = [rows[s] for s in range(resumed_at + 1, step + 1)]
    tokens = rows[step]["tokens"] - rows[resumed_at]["tokens"]
    seconds = sum((row["tokens"] - rows[row["step"] - 1]["tokens"]) / row["tokens_per_s"] for row in since)
    assert rate <= tokens / seconds + 1, (rate, tokens, seconds)
    assert_nothing_lost(run_dir)


# --------------------------------------------------------------------------- 10: GGUF cache


def test_gguf_is_dequantised_once_per_run_directory(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from gguf_fixture import write_tiny_llama_gguf

    info = write_tiny_llama_gguf(tmp_path / "gguf" / "tiny.gguf")
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS, run={"max_steps": 3},
                         model={"init": "pretrained", "name_or_path": str(tmp_path / "gguf"),
                                "gguf_file": info["gguf_file"]})
    run_dir = tmp_path / "run"
    cache = run_dir / "base-model"

    first = train(recipe)
    assert first.code == EXIT_OK, first.text
    assert "de-quantising tiny.gguf (once per run directory" in first.text
    assert json.loads((cache / "gguf-source.json").read_text())["gguf"] == str(tmp_path / "gguf" / "tiny.gguf")
    first_weights = weights(latest(run_dir))
    cached = {path.name: path.stat().st_mtime_ns for path in cache.iterdir()}

    # A fresh start in the same run directory (say the first increment never checkpointed).
    shutil.rmtree(run_dir / "checkpoints")
    (run_dir / "ledger.json").unlink()
    second = train(recipe)

    assert second.code == EXIT_OK, second.text
    assert f"loading the de-quantised GGUF model from {cache}" in second.text
    assert "de-quantising" not in second.text
    assert {path.name: path.stat().st_mtime_ns for path in cache.iterdir()} == cached
    # The cache holds exactly the converted weights: both fresh starts train to the same model.
    second_weights = weights(latest(run_dir))
    assert all(torch.equal(first_weights[name], second_weights[name]) for name in first_weights)
