"""``olm tune``: the --space syntax, the objective, and a study that never touches the real run."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import add_shard, make_documents, tiny_recipe, write_jsonl, write_recipe
from e2e_helpers import cli

from olm_cli.errors import RecipeError
from olm_cli.recipe import load_recipe
from olm_cli.tune import STUDY_FILE, STUDY_NAME, objective_of, parse_space


def test_space_forms() -> None:
    lr = parse_space("optim.lr=1e-5:1e-3:log")
    assert (lr.key, lr.kind, lr.low, lr.high, lr.log) == ("optim.lr", "float", 1e-5, 1e-3, True)
    assert lr.override(2.5e-4) == "optim.lr=0.00025"
    ratio = parse_space("replay.ratio=0:0.5")
    assert (ratio.kind, ratio.low, ratio.high, ratio.log) == ("float", 0.0, 0.5, False)
    size = parse_space("batch.size=4:16")
    assert (size.kind, size.override(8)) == ("int", "batch.size=8")
    policy = parse_space("replay.policy=reservoir,fifo")
    assert (policy.kind, policy.choices, policy.override("fifo")) == ("choice", ("reservoir", "fifo"), "replay.policy=fifo")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("optim.lr", "expected KEY=LOW:HIGH[:log] or KEY=A,B,C"),
        ("optim.lr=1e-3:1e-5", "LOW must be below HIGH"),
        ("optim.lr=0:1e-3:log", "a log range needs LOW > 0"),
        ("optim.lr=1e-5:1e-3:ln", "a range is LOW:HIGH or LOW:HIGH:log"),
        ("optim.lr=a:b", "must be numbers"),
        ("replay.policy=fifo", "a choice needs at least two"),
        ("optim..lr=1:2", "has an empty part"),
    ],
)
def test_malformed_space_is_a_usage_error_naming_it(text: str, why: str) -> None:
    with pytest.raises(RecipeError) as raised:
        parse_space(text)
    assert f"--space {text!r}" in str(raised.value) and why in str(raised.value)


def test_objective_is_mean_loss_plus_weighted_forgetting() -> None:
    before = {"alpha": 2.0, "beta": 3.0, "gamma": 4.0}
    after = {"alpha": 2.5, "beta": 2.0, "gamma": 3.5}
    # beta was trained (its drop is not transfer to count); alpha rose by 0.5, gamma fell (clamped at 0).
    objective, mean_loss, forgetting = objective_of(before, after, "beta", 2.0)
    assert mean_loss == pytest.approx(8.0 / 3)
    assert forgetting == pytest.approx(0.25)
    assert objective == pytest.approx(8.0 / 3 + 0.5)
    assert objective_of(before, after, "beta", 0.0)[0] == pytest.approx(mean_loss)


def _setup(tmp_path: Path, **sections: Any) -> Path:
    add_shard(tmp_path / "stream", "alpha", 0, docs=12)
    sets = {}
    for domain in ("alpha", "beta"):
        sets[domain] = str(write_jsonl(tmp_path / "eval" / f"{domain}.jsonl", make_documents(domain, 6, 99)))
    recipe = tiny_recipe(tmp_path, eval={"sets": sets, "max_tokens": 2000},
                         replay={"policy": "reservoir", "capacity": 64, "ratio": 0.1}, **sections)
    return write_recipe(tmp_path, recipe)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("optim.lrr=1e-5:1e-3", "--space 'optim.lrr=1e-5:1e-3': optim.lrr: unknown key; did you mean `lr`?"),
        ("replay.ratio=0:1.5", "--space 'replay.ratio=0:1.5': replay.ratio: Input should be less than 1"),
        ("optim.lr=1e-5:1e-3:lg", "a range is LOW:HIGH or LOW:HIGH:log"),
    ],
)
def test_bad_space_exits_2_before_any_trial(tmp_path: Path, space: str, message: str) -> None:
    recipe = _setup(tmp_path)
    result = cli("tune", "--config", recipe, "--trials", "1", "--space", space)
    assert result.code == 2, result.text
    assert message in " ".join(result.err.split())
    assert not (tmp_path / "run.tune").exists()


def test_tune_needs_eval_sets_and_refuses_to_overwrite(tmp_path: Path) -> None:
    recipe = _setup(tmp_path)
    no_eval = write_recipe(tmp_path, {**tiny_recipe(tmp_path), "eval": {"sets": {}}}, name="no-eval.yaml")
    result = cli("tune", "--config", no_eval, "--space", "optim.lr=1e-5:1e-3:log")
    assert result.code == 2 and "needs eval.sets" in result.err
    mine = tmp_path / "mine.yaml"
    mine.write_text("keep me\n")
    result = cli("tune", "--config", recipe, "--space", "optim.lr=1e-5:1e-3:log", "--out", mine)
    assert result.code == 2 and "--force" in result.err
    assert mine.read_text() == "keep me\n"


def _tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and mode under ``root``: what "never touched" means."""
    digest = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = Path(directory) / name
            info = path.lstat()
            content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else os.readlink(path)
            digest[str(path.relative_to(root))] = (content, info.st_mode)
    return digest


SPACE = ["--space", "optim.lr=1e-4:1e-2:log", "--space", "replay.ratio=0:0.5"]


@pytest.mark.slow
def test_tune_runs_trials_in_scratch_copies_and_resumes(tmp_path: Path) -> None:
    import optuna

    recipe = _setup(tmp_path)
    assert cli("train", "--config", recipe).code == 0
    add_shard(tmp_path / "stream", "beta", 0, docs=12)  # the pending data the trials train on
    run_dir = tmp_path / "run"
    before = _tree_digest(run_dir)

    result = cli("tune", "--config", recipe, "--trials", "2", "--steps", "3", *SPACE, "--json")
    assert result.code == 0, result.text
    report = result.json()
    assert [t["state"] for t in report["trials"]] == ["COMPLETE", "COMPLETE"]
    for trial in report["trials"]:
        assert set(trial["losses"]) == {"alpha", "beta"}
        assert trial["objective"] == pytest.approx(trial["mean_loss"] + trial["forgetting"])
        assert 1e-4 <= trial["params"]["optim.lr"] <= 1e-2 and 0 <= trial["params"]["replay.ratio"] <= 0.5
    assert _tree_digest(run_dir) == before, "the real run directory changed"

    tune_dir = tmp_path / "run.tune"
    best = report["best"]
    assert best["objective"] == min(t["objective"] for t in report["trials"])
    best_recipe = load_recipe(report["best_recipe"])
    assert best_recipe.optim.lr == pytest.approx(best["params"]["optim.lr"])
    assert best_recipe.replay.ratio == pytest.approx(best["params"]["replay.ratio"])
    assert Path(best_recipe.run.dir) == run_dir  # the real run, not a scratch copy
    assert Path(report["best_recipe"]).read_text().startswith("# olm train --config ")
    assert not list((tune_dir / "trials").iterdir()), "scratch copies are removed after each trial"

    # A process killed mid-trial leaves a RUNNING trial: the next run marks it failed and continues.
    storage = f"sqlite:///{tune_dir / STUDY_FILE}"
    optuna.load_study(study_name=STUDY_NAME, storage=storage).ask()
    result = cli("tune", "--config", recipe, "--trials", "4", "--steps", "3", *SPACE, "--json")
    assert result.code == 0, result.text
    states = [t["state"] for t in result.json()["trials"]]
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    params = [tuple(t["params"].values()) for t in result.json()["trials"]]
    assert params[3] not in params[:2], "a continued study drew an earlier trial again"
    assert _tree_digest(run_dir) == before

    # The same study with another question is refused.
    result = cli("tune", "--config", recipe, "--trials", "5", "--steps", "4", *SPACE)
    assert result.code == 2 and "steps differ" in " ".join(result.err.split())
