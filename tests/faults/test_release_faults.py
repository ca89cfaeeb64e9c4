"""Issue 9, "never fail silently": what serving reads (``RUN/releases/latest``) only moves to a
model that passed the gate, through the real ``olm train`` command line.

Each test asserts the exit code, the one-line message, and that nothing is lost: the previous
release still loads with plain ``transformers`` and is finite, and the training state
(``RUN/checkpoints``) is consistent.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import add_shard
from e2e_helpers import cli, latest, ledger_summary, make_recipe, trainer_state
from transformers import AutoModelForCausalLM, AutoTokenizer

from olm_cli.errors import EXIT_NOT_RELEASED, CheckpointError

# End to end (every test trains through the CLI): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

EVAL = {"alpha": "eval/alpha.jsonl", "beta": "eval/beta.jsonl"}


def _recipe(tmp_path: Path, **sections: dict) -> Path:
    eval_dir = tmp_path / "eval-src"
    add_shard(eval_dir, "alpha", 99, docs=6)
    add_shard(eval_dir, "beta", 99, docs=6)
    sets = {"alpha": str(eval_dir / "00-alpha" / "shard-099.jsonl"), "beta": str(eval_dir / "01-beta" / "shard-099.jsonl")}
    eval_section = {"sets": sets, "max_tokens": 256, **sections.pop("eval", {})}
    return make_recipe(tmp_path, shards=[("alpha", 0)], docs=8, eval=eval_section, **sections)


def _release_target(run_dir: Path) -> str:
    return os.readlink(run_dir / "releases" / "latest")


def _assert_loads_and_finite(path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(path)
    AutoTokenizer.from_pretrained(path)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "releases" / "history.jsonl").read_text().splitlines()]


def test_a_completed_increment_is_released_and_loads_with_plain_transformers(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path)
    result = cli("train", "--config", recipe)
    run_dir = tmp_path / "run"

    assert result.code == 0, result.text
    assert result.has("release release-0001 published → releases/latest"), result.text
    assert _release_target(run_dir) == "release-0001"
    release = run_dir / "releases" / "latest"
    _assert_loads_and_finite(release)
    # Model and tokenizer only: the training state stays in checkpoints/.
    assert not (release / "optimizer.safetensors").exists() and not (release / "replay").exists()
    card = (release / "README.md").read_text()
    assert "alpha" in card and "beta" in card
    info = json.loads((release / "release.json").read_text())
    assert info["released"] is True and info["increment"] == 1
    assert info["step"] == trainer_state(latest(run_dir))["global_step"]


def test_a_failed_gate_keeps_the_previous_release_and_exits_3(tmp_path: Path) -> None:
    # A zero budget on every domain: the second increment (another domain) cannot get better everywhere.
    recipe = _recipe(tmp_path, eval={"gate": {"max_regression": {"*": 0.0}, "relative": False}})
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    first = (run_dir / "releases" / "release-0001" / "model.safetensors").read_bytes()
    add_shard(tmp_path / "stream", "beta", 0, docs=8)

    # A large learning rate on new text makes the first domain's loss rise for sure.
    result = cli("train", "--config", recipe, "optim.lr=0.05")

    assert result.code == EXIT_NOT_RELEASED, result.text
    assert result.has("increment 2 trained but not released:"), result.text
    assert result.has("releases/latest stays release-0001"), result.text
    assert "Traceback" not in result.text
    assert _release_target(run_dir) == "release-0001"
    assert (run_dir / "releases" / "release-0001" / "model.safetensors").read_bytes() == first
    _assert_loads_and_finite(run_dir / "releases" / "latest")
    # Trained all the same: the checkpoint and ledger moved on, the rejected release is kept for inspection.
    assert ledger_summary(run_dir)["01-beta/shard-000.jsonl"][0] == "done"
    assert trainer_state(latest(run_dir))["increment"] == 2
    rejected = json.loads((run_dir / "releases" / "release-0002" / "release.json").read_text())
    assert rejected["released"] is False and rejected["reasons"]
    assert [row["released"] for row in _history(run_dir)] == [True, False]
    status = cli("status", "--run", run_dir, "--json").json()
    assert status["last_gate"]["released"] is False
    # The next night with nothing new does not retry or move anything.
    again = cli("train", "--config", recipe)
    assert again.code == 0 and again.has("nothing to do"), again.text
    assert _release_target(run_dir) == "release-0001"


def test_a_domain_that_evaluates_to_nan_is_trained_but_never_served(tmp_path: Path, monkeypatch) -> None:
    import olm_cli.evaluation.domains

    recipe = _recipe(tmp_path)
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    add_shard(tmp_path / "stream", "beta", 0, docs=8)
    measure = olm_cli.evaluation.domains.evaluate_domains

    def overflowing(*args, **kwargs):
        results = measure(*args, **kwargs)
        results["alpha"]["loss"] = float("nan")
        return results

    monkeypatch.setattr(olm_cli.evaluation.domains, "evaluate_domains", overflowing)
    result = cli("train", "--config", recipe)

    assert result.code == EXIT_NOT_RELEASED, result.text
    assert result.has("increment 2 trained but not released:"), result.text
    assert "alpha" in result.text.split("not released:")[1]
    assert _release_target(run_dir) == "release-0001"
    _assert_loads_and_finite(run_dir / "releases" / "latest")
    # release.json and the history stay strict JSON with a NaN loss in them.
    for line in (run_dir / "releases" / "history.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))


def test_a_crash_between_checkpoint_and_release_is_released_by_the_next_run(tmp_path: Path, monkeypatch) -> None:
    import olm_cli.release

    recipe = _recipe(tmp_path)
    run_dir = tmp_path / "run"

    def disk_full(*_args, **_kwargs):
        raise CheckpointError("could not write release release-0001: No space left on device")

    monkeypatch.setattr(olm_cli.release, "publish_release", disk_full)
    result = cli("train", "--config", recipe)
    monkeypatch.undo()
    assert result.code == 1, result.text
    assert trainer_state(latest(run_dir))["increment_complete"] is True
    assert not (run_dir / "releases" / "latest").exists()

    result = cli("train", "--config", recipe)

    assert result.code == 0, result.text
    assert result.has("increment 1 was checkpointed"), result.text
    assert result.has("release release-0001 published"), result.text
    assert result.has("nothing to do"), result.text
    _assert_loads_and_finite(run_dir / "releases" / "latest")
    # A third run has nothing left to do at all, and stays torch-free fast.
    again = cli("train", "--config", recipe)
    assert again.code == 0 and "was checkpointed" not in again.text, again.text


def test_release_disabled_writes_no_release(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, release={"enabled": False})
    result = cli("train", "--config", recipe)
    assert result.code == 0, result.text
    assert not (tmp_path / "run" / "releases").exists()
