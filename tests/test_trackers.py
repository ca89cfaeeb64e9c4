"""run.trackers: namespaced tags, eval and matrix metrics after every increment, read back offline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import add_shard, tiny_recipe

from olm_cli.errors import RecipeError
from olm_cli.recipe import recipe_from_dict
from olm_cli.trackers import Trackers, downstream_tags, eval_tags, step_tags


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_step_tags_are_namespaced_without_clock_or_counters() -> None:
    row = {"step": 7, "increment": 2, "increment_step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": float("nan"),
           "tokens": 4096, "tokens_per_s": 1234.5, "domain": "code", "batch_size": 8, "micro_batch": 4,
           "replayed": 2, "unselected": 5, "pool_mean_entropy": 3.25, "time": 1.7e9, "cpu_time": 12.0}
    tags = step_tags(row)
    assert tags == {"train/loss": 2.5, "train/lr": 1e-3, "train/tokens": 4096, "train/tokens_per_s": 1234.5,
                    "train/batch_size": 8, "train/micro_batch": 4, "train/replay_share": 0.25,
                    "select/unselected": 5, "select/pool_mean_entropy": 3.25}  # grad_norm NaN: left out
    skipped = {"step": 8, "increment": 2, "increment_step": 4, "skipped": True, "loss": None, "grad_norm": None,
               "reason": "non-finite loss (nan)", "nonfinite": ["loss"]}
    assert step_tags(skipped) == {"train/skipped_batches": 1}


def test_eval_tags_hold_every_domain_and_the_matrix_summary() -> None:
    results = {"alpha": {"loss": 2.0, "perplexity": math.exp(2.0), "tokens": 100},
               "beta": {"loss": float("inf"), "perplexity": float("inf"), "tokens": 100}}
    summary = {"average_final_loss": 2.5, "forgetting": {"alpha": 0.25}, "bwt_per_domain": {"alpha": 0.125},
               "fwt_per_domain": {}, "intransigence": {}, "mean_forgetting": 0.25, "bwt": 0.125, "fwt": None,
               "mean_intransigence": None}
    assert eval_tags(results, summary) == {
        "eval/alpha/loss": 2.0, "eval/alpha/perplexity": math.exp(2.0), "eval/mean_loss": 2.5,
        "cl/forgetting/alpha": 0.25, "cl/bwt/alpha": 0.125, "cl/mean_forgetting": 0.25, "cl/bwt": 0.125,
    }
    assert downstream_tags({"mc": {"acc": 0.5, "acc_stderr": 0.1, "alias": "mc"}}) == {
        "downstream/mc/acc": 0.5, "downstream/mc/acc_stderr": 0.1}
    assert eval_tags({"c++ (v2)": {"loss": 1.0}}, None) == {"eval/c__ _v2_/loss": 1.0}  # MLflow's tag alphabet


def test_tensorboard_key_is_an_alias_of_trackers(tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny_recipe(tmp_path, run={"tensorboard": True, "trackers": ["mlflow", "mlflow"]}))
    assert recipe.run.trackers == ["tensorboard", "mlflow"]
    with pytest.raises(RecipeError, match="run.trackers.0"):
        recipe_from_dict(tiny_recipe(tmp_path, run={"trackers": ["wandbb"]}))
    with pytest.raises(RecipeError, match="run.log_with: unknown key; did you mean `trackers`"):
        recipe_from_dict(tiny_recipe(tmp_path, run={"log_with": "wandb"}))
    with pytest.raises(RecipeError, match="tracker_options names wandb, which is not in run.trackers"):
        recipe_from_dict(tiny_recipe(tmp_path, run={"tracker_options": {"wandb": {"entity": "me"}}}))


def test_missing_tracker_package_is_a_recipe_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    recipe = recipe_from_dict(tiny_recipe(tmp_path, run={"trackers": ["wandb"]}))
    with pytest.raises(RecipeError, match="pip install wandb") as caught:
        Trackers.open(recipe)
    assert caught.value.exit_code == 2


class _Flaky:
    name = "flaky"

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def log(self, values: dict[str, float], step: int) -> None:
        if len(self.logged) == 1:
            raise ConnectionError("quota exceeded")
        self.logged.append((values, step))

    def finish(self) -> None:
        pass


def test_a_failing_tracker_is_reported_once_and_dropped() -> None:
    said: list[str] = []
    flaky, steady = _Flaky(), _Flaky()
    steady.log = lambda values, step: steady.logged.append((values, step))  # type: ignore[method-assign]
    trackers = Trackers([flaky, steady], said.append)
    for step in (1, 2, 3):
        trackers.log({"train/loss": float(step)}, step)
    assert flaky.logged == [({"train/loss": 1.0}, 1)]
    assert [s for _, s in steady.logged] == [1, 2, 3]
    assert len(said) == 1 and "tracker flaky failed (ConnectionError: quota exceeded)" in said[0]


@pytest.mark.slow
def test_tensorboard_and_mlflow_get_train_eval_and_forgetting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from olm_cli.increment import run_increment

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this switch
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    eval_a = add_shard(tmp_path / "eval", "alpha", 9)
    eval_b = add_shard(tmp_path / "eval", "beta", 9)
    recipe = recipe_from_dict(tiny_recipe(
        tmp_path, eval={"sets": {"alpha": str(eval_a), "beta": str(eval_b)}},
        run={"trackers": ["tensorboard", "mlflow"], "tracker_project": "nightly"}))
    add_shard(tmp_path / "stream", "alpha", 0)
    run_increment(recipe)
    add_shard(tmp_path / "stream", "beta", 0)
    run_increment(recipe)
    run_dir = tmp_path / "run"
    rows = _metrics(run_dir)
    history = [json.loads(line) for line in (run_dir / "eval" / "history.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "eval" / "matrix.json").read_text())["summary"]
    assert summary["forgetting"], "the second increment should measure forgetting on alpha"

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/grad_norm", "eval/alpha/loss",
            "eval/beta/loss", "cl/forgetting/alpha", "cl/mean_forgetting"} <= tags
    assert not tags & {"step", "increment", "increment_step", "time", "cpu_time", "loss", "lr"}
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    eval_alpha = events.Scalars("eval/alpha/loss")  # row 0 at step 0, then after each increment
    assert [(e.step, e.value) for e in eval_alpha] == [
        (h["step"], pytest.approx(h["domains"]["alpha"]["loss"], rel=1e-6)) for h in history]
    forgetting = events.Scalars("cl/forgetting/alpha")
    assert [(e.step, e.value) for e in forgetting] == [(rows[-1]["step"], pytest.approx(summary["forgetting"]["alpha"], rel=1e-6))]
    assert abs(loss[-1].wall_time - rows[-1]["time"]) < 60  # the tracker's own clock, in seconds

    # MLflow: one run for the run directory, continued by the second night.
    identity = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("nightly")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [identity["mlflow"]["run_id"]]
    run_id = runs[0].info.run_id
    history_loss = client.get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history_loss) == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows]
    assert client.get_metric_history(run_id, "cl/forgetting/alpha")[0].value == pytest.approx(
        summary["forgetting"]["alpha"], rel=1e-6)
    assert "step" not in runs[0].data.metrics and "time" not in runs[0].data.metrics
    params = runs[0].data.params  # the recipe, logged once when the tracker run began
    assert params["optim.lr"] == "0.001" and params["run.trackers"] == '["tensorboard", "mlflow"]'


def test_a_tracker_that_cannot_start_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import olm_cli.trackers as trackers_module

    class NoNetwork:
        name = "mlflow"

        def start(self) -> None:
            raise ConnectionError("mlflow.example: connection refused")

    monkeypatch.setattr(trackers_module, "_build", lambda *args: NoNetwork())
    said: list[str] = []
    recipe = recipe_from_dict(tiny_recipe(tmp_path, run={"trackers": ["mlflow"]}))
    trackers = Trackers.open(recipe, say=said.append)
    assert trackers.names == []
    assert said == ["[yellow]warning:[/] tracker mlflow did not start (ConnectionError: mlflow.example: connection "
                    "refused); training goes on without it"]
    trackers.log({"train/loss": 1.0}, 1)  # nothing to log to, nothing raised


@pytest.mark.slow
def test_a_release_finished_by_the_next_run_reaches_the_tracker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between the final checkpoint and the release: the next run's evaluation is logged too."""
    from e2e_helpers import cli, make_recipe
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import olm_cli.release
    from olm_cli.errors import CheckpointError

    eval_set = add_shard(tmp_path / "eval", "alpha", 99, docs=6)
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=8, eval={"sets": {"alpha": str(eval_set)}},
                         run={"trackers": ["tensorboard"]})

    def disk_full(*_args: Any, **_kwargs: Any) -> None:
        raise CheckpointError("could not write release release-0001: No space left on device")

    monkeypatch.setattr(olm_cli.release, "publish_release", disk_full)
    assert cli("train", "--config", recipe).code == 1
    monkeypatch.undo()
    result = cli("train", "--config", recipe)
    assert result.code == 0 and result.has("increment 1 was checkpointed"), result.text

    step = _metrics(tmp_path / "run")[-1]["step"]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    # Row 0, the evaluation before the failed release, and the one of the run that released it.
    assert [e.step for e in events.Scalars("eval/alpha/loss")] == [0, step, step]
