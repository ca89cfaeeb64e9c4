"""``olm status`` and ``olm report`` on runs with ``optim.schedule: wsd`` and ``release.merge: sma``.

What they must show (docs/forgetting.md, "Watching a cooldown"): the schedule's phase, the trunk
step against the branch step, the last cooldown and its release's eval against the trunk, the
checkpoints an SMA release averaged; the report's cooldown spans and each release's origin. The
end-to-end tests train real tiny models through ``olm train``, stop or kill them mid-cooldown,
and read what the two commands say at that moment and after the release.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from e2e_helpers import (
    add_shard,
    assert_bit_identical,
    cli,
    make_recipe,
    reaped,
    spawn,
    wait_for,
    weights,
)
from matplotlib import image as matplotlib_image
from test_wsd import _StopAfter

from olm_cli.rundir import CheckpointManager
from olm_cli.rundir.schedule_status import schedule_status
from olm_cli.schedule import cooldown_multiplier

LR = 1e-3


def _wsd_recipe(root: Path, **extra: dict[str, Any]) -> Path:
    sections: dict[str, dict[str, Any]] = {
        "optim": {"schedule": "wsd", "lr": LR, "warmup_steps": 2, "cooldown_fraction": 1.0},
        "replay": {"policy": "reservoir", "ratio": 0.25, "capacity": 48},
        "run": {"checkpoint_every": 2},
        "eval": {"sets": {"alpha": str(root / "stream" / "00-alpha" / "shard-000.jsonl")}, "max_tokens": 128},
    }
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return make_recipe(root, shards=[("alpha", 0)], docs=12, **sections)


def _status(run_dir: Path) -> dict[str, Any]:
    result = cli("status", "--run", run_dir, "--json")
    assert result.code == 0, result.text
    return result.json()


def _report(run_dir: Path) -> dict[str, Any]:
    result = cli("report", "--run", run_dir)
    assert result.code == 0, result.text
    return json.loads((run_dir / "report" / "report.json").read_text(encoding="utf-8"))


def _metrics(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _branch_rates(steps: int, done: int) -> list[float]:
    return [LR * cooldown_multiplier(i, steps, shape="sqrt", min_ratio=0.1) for i in range(done)]


@pytest.mark.slow
def test_status_and_report_through_a_stopped_cooldown_its_release_and_the_next_increment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from olm_cli import cooldown

    reference_root = tmp_path / "reference"
    assert cli("train", "--config", _wsd_recipe(reference_root)).code == 0
    root = tmp_path / "stopped"
    recipe = _wsd_recipe(root)
    run_dir = root / "run"
    run = cooldown.CooldownBranch.run
    monkeypatch.setattr(cooldown.CooldownBranch, "run", lambda self, stop: run(self, _StopAfter(3)))
    stopped = cli("train", "--config", recipe, "--json")
    monkeypatch.undo()
    assert stopped.json()["status"] == "interrupted", stopped.text
    trunk = CheckpointManager(run_dir / "checkpoints").list()[-1]
    steps = json.loads((trunk / "trainer_state.json").read_text())["global_step"]  # fraction 1.0: n = S

    # Mid-cooldown: the phase, branch step 3 of n off the trunk's last step, nothing released yet.
    view = _status(run_dir)["schedule"]
    assert view["phase"] == "cooldown" and view["trunk_step"] == steps and view["last_cooldown"] is None
    assert isinstance(view["branch"].pop("loss"), float)
    assert view["branch"] == {"increment": 1, "trunk": trunk.name, "step": 3, "steps": steps, "checkpointed_step": 3,
                              "lr": pytest.approx(_branch_rates(steps, 3)[-1])}
    text = cli("status", "--run", run_dir).text
    assert f"schedule: wsd, cooldown 3 of {steps} steps (increment 1); the next olm train finishes it" in text
    assert f"trunk / branch: trunk step {steps}; branch step 3/{steps} off {trunk.name}" in text
    partial = _report(run_dir)
    [span] = partial["cooldowns"]
    assert (span["complete"], span["from_step"], span["to_step"], span["steps"]) == (False, steps, steps + 3, steps)
    assert span["step"] == [steps + 1, steps + 2, steps + 3] and span["release"] is None
    assert span["lr"] == pytest.approx(_branch_rates(steps, 3))
    assert partial["figures"]["training"]["cooldowns"] == [[1, steps, steps + 3]]
    assert "unfinished" in (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert partial["status"]["schedule"]["phase"] == "cooldown"

    # Finished: the release is the branch, bit-identical to the uninterrupted run's despite the trunk's eval.
    assert cli("train", "--config", recipe).code == 0
    assert_bit_identical(weights(run_dir / "releases" / "release-0001"),
                         weights(reference_root / "run" / "releases" / "release-0001"))
    rows = _metrics(run_dir)
    branch_rows = [r for r in rows if r.get("phase") == "cooldown"]
    assert [r["cooldown_step"] for r in branch_rows] == list(range(1, steps + 1))
    assert {r["step"] for r in branch_rows} == {steps}
    assert [r["lr"] for r in branch_rows] == pytest.approx(_branch_rates(steps, steps))
    assert {r["lr"] for r in rows if r.get("phase") is None} == {LR}
    view = _status(run_dir)["schedule"]
    assert view["phase"] == "stable" and view["branch"] is None
    last = view["last_cooldown"]
    assert (last["increment"], last["trunk"], last["steps"], last["step"]) == (1, trunk.name, steps, steps)
    assert last["release"] == {"name": "release-0001", "released": True, "reasons": [], "kind": "cooldown"}
    release = json.loads((run_dir / "releases" / "release-0001" / "release.json").read_text())
    evaluated = json.loads((run_dir / "eval" / "history.jsonl").read_text().splitlines()[-1])
    alpha = last["eval"]["alpha"]
    assert alpha["release"] == evaluated["domains"]["alpha"]["loss"] == release["eval"]["alpha"]["loss"]
    assert alpha["trunk"] == release["origin"]["trunk_eval"]["alpha"]
    assert alpha["change"] == pytest.approx(alpha["release"] - alpha["trunk"])
    assert release["origin"]["kind"] == "cooldown" and release["origin"]["cooldown"]["step"] == steps
    text = cli("status", "--run", run_dir).text
    assert "schedule: wsd, stable" in text
    assert f"last cooldown: increment 1: {steps} steps off {trunk.name}" in text and "release-0001 released" in text
    assert f"eval: alpha {alpha['release']:.4f} (trunk {alpha['trunk']:.4f}, {alpha['change']:+.4f})" in text

    # A second increment: a second span off its own trunk step; the trunk's series holds no branch line.
    add_shard(root / "stream", "beta", 0, docs=12)
    assert cli("train", "--config", recipe).code == 0
    data = _report(run_dir)
    second = CheckpointManager(run_dir / "checkpoints").list()[-1]
    assert [(c["increment"], c["complete"], c["trunk"], c["release"], c["release_kind"]) for c in data["cooldowns"]] \
        == [(1, True, trunk.name, "release-0001", "cooldown"), (2, True, second.name, "release-0002", "cooldown")]
    assert data["cooldowns"][1]["from_step"] == int(second.name.split("-")[1])
    assert data["training"]["step"] == sorted(set(data["training"]["step"]))
    assert [r["origin"]["kind"] for r in data["releases"]] == ["cooldown", "cooldown"]
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert f"cooldown of {steps} steps off {trunk.name}" in page and "Cooldown branches" in page
    assert _status(run_dir)["schedule"]["last_cooldown"]["increment"] == 2


@pytest.mark.slow
def test_kill_9_mid_cooldown_status_report_and_no_duplicate_branch_lines(tmp_path: Path) -> None:
    recipe = _wsd_recipe(tmp_path, run={"checkpoint_every": 2})
    run_dir = tmp_path / "run"
    with reaped(spawn("train", "--config", recipe, log=tmp_path / "killed.log")) as proc:
        wait_for(lambda: bool(CheckpointManager(run_dir / "cooldown").list()), proc, what="a cooldown checkpoint")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "finished before the kill"

    view = _status(run_dir)["schedule"]
    branch = view["branch"]
    assert view["phase"] == "cooldown" and branch["increment"] == 1
    assert branch["checkpointed_step"] is not None and branch["step"] >= branch["checkpointed_step"] >= 2
    assert "the next olm train finishes it" in cli("status", "--run", run_dir).text
    [span] = _report(run_dir)["cooldowns"]
    assert not span["complete"] and span["done_steps"] == branch["step"]
    _renders_in_chromium(run_dir / "report" / "index.html", tmp_path)

    assert cli("train", "--config", recipe).code == 0
    branch_rows = [r for r in _metrics(run_dir) if r.get("phase") == "cooldown"]
    assert [r["cooldown_step"] for r in branch_rows] == list(range(1, branch["steps"] + 1))
    view = _status(run_dir)["schedule"]
    assert view["phase"] == "stable" and view["last_cooldown"]["release"]["name"] == "release-0001"


def _renders_in_chromium(page: Path, tmp_path: Path) -> None:
    """The page of a killed run draws in a browser (skipped where chromium is missing, as in test_report)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return
    shot = tmp_path / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1440,1600",
                    page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(matplotlib_image.imread(str(shot)))[..., :3]
    assert pixels.shape[:2] == (1600, 1440) and (pixels[200:1200].min(axis=2) < 0.9).mean() > 0.05


@pytest.mark.slow
def test_sma_release_shows_the_checkpoints_it_averaged(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=12, optim={"schedule": "constant", "warmup_steps": 2},
                         release={"merge": "sma", "merge_last": 2}, run={"checkpoint_every": 3, "keep_checkpoints": 2},
                         eval={"sets": {"alpha": str(tmp_path / "stream" / "00-alpha" / "shard-000.jsonl")},
                               "max_tokens": 128})
    run_dir = tmp_path / "run"
    assert cli("train", "--config", recipe).code == 0
    kept = [p.name for p in CheckpointManager(run_dir / "checkpoints").list()]
    view = _status(run_dir)["schedule"]
    assert view["phase"] is None and view["last_cooldown"] is None and view["branch"] is None
    sma = view["last_sma"]
    assert (sma["averaged"], sma["merge_last"], sma["release"]["kind"]) == (kept, 2, "sma")
    assert set(sma["eval"]["alpha"]) == {"release", "trunk", "change"} and sma["eval"]["alpha"]["trunk"] is not None
    text = cli("status", "--run", run_dir).text
    assert f"last SMA: release-0001 (increment 1) = average of 2: {', '.join(kept)}" in text
    assert "schedule:" not in text
    data = _report(run_dir)
    assert data["cooldowns"] == [] and data["releases"][0]["origin"]["averaged"] == kept
    assert f"SMA of 2 checkpoints off {kept[-1]}" in (run_dir / "report" / "index.html").read_text(encoding="utf-8")


# --------------------------------------------------------------------------- without training


def _run_dir(tmp_path: Path, optim: dict[str, Any], *, state: dict[str, Any] | None = None,
             metrics: list[dict[str, Any]] | None = None, release: dict[str, Any] | None = None) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"optim": optim, "release": release or {}}), encoding="utf-8")
    if state is not None:
        CheckpointManager(run / "checkpoints").save(
            state["global_step"], lambda d: (d / "trainer_state.json").write_text(json.dumps(state)))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics or []), encoding="utf-8")
    return run


def _view(run: Path) -> dict[str, Any] | None:
    latest = CheckpointManager(run / "checkpoints").list()
    return schedule_status(run, latest[-1] if latest else None, [])


def test_runs_without_wsd_or_sma_have_no_schedule_view(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, {"schedule": "cosine"}, metrics=[{"step": 1, "increment": 1, "loss": 3.0}])
    assert _view(run) is None
    assert cli("status", "--run", run, "--json").json()["schedule"] is None
    assert "schedule:" not in cli("status", "--run", run).text


def test_warm_up_then_stable_from_the_trunks_last_logged_step(tmp_path: Path) -> None:
    rows = [{"step": s, "increment": 1, "loss": 3.0} for s in range(1, 4)]
    run = _run_dir(tmp_path, {"schedule": "wsd", "warmup_steps": 5}, metrics=rows)
    view = _view(run)
    assert view is not None and (view["phase"], view["trunk_step"], view["warmup_steps"]) == ("warm-up", 3, 5)
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"step": 6, "increment": 1, "loss": 2.9}) + "\n")
    view = _view(run)
    assert view is not None and (view["phase"], view["trunk_step"]) == ("stable", 6)


def test_a_complete_unreleased_increment_is_a_cooldown_not_started_then_a_release_pending(tmp_path: Path) -> None:
    state = {"increment": 1, "increment_complete": True, "step": 10, "global_step": 10}
    run = _run_dir(tmp_path, {"schedule": "wsd", "warmup_steps": 2, "cooldown_fraction": 0.2}, state=state)
    view = _view(run)
    assert view is not None and view["phase"] == "cooldown"
    assert (view["branch"]["step"], view["branch"]["steps"], view["branch"]["trunk"]) == (0, 2, "step-00000010")
    (run / "cooldown-history.jsonl").write_text(json.dumps(
        {"increment": 1, "trunk": "step-00000010", "steps": 2, "step": 2, "tokens": 64, "seconds": 0.1,
         "first_loss": 3.0, "last_loss": 2.9}) + "\n", encoding="utf-8")
    view = _view(run)
    assert view is not None and view["phase"] == "release pending" and view["branch"] is None
    assert view["last_cooldown"]["release"] is None and view["last_cooldown"]["steps"] == 2


def test_a_branch_without_metrics_lines_is_drawn_from_its_history_and_the_recipe(tmp_path: Path) -> None:
    from olm_cli.report.sources import gather

    optim = {"schedule": "wsd", "lr": LR, "warmup_steps": 2, "cooldown_shape": "sqrt", "min_lr_ratio": 0.1}
    run = _run_dir(tmp_path, optim, metrics=[{"step": s, "increment": 1, "loss": 3.0, "lr": LR} for s in range(1, 9)])
    (run / "cooldown-history.jsonl").write_text(json.dumps(
        {"increment": 1, "trunk": "step-00000008", "steps": 4, "step": 4, "tokens": 128, "seconds": 0.2,
         "first_loss": 3.1, "last_loss": 2.7}) + "\n", encoding="utf-8")
    [span] = gather(run)["cooldowns"]
    assert (span["from_step"], span["to_step"], span["complete"], span["lr_source"]) == (8, 12, True, "recipe")
    assert span["step"] == [9, 10, 11, 12] and span["loss"] == [3.1, None, None, 2.7]
    assert span["lr"] == pytest.approx(_branch_rates(4, 4))


def test_the_status_reader_names_the_branch_lines_as_the_branch_writes_them() -> None:
    from olm_cli import cooldown
    from olm_cli.rundir import schedule_status as reader

    assert reader.PHASE == cooldown.PHASE == "cooldown"


def test_a_hand_edited_history_is_shown_with_gaps_never_a_crash(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, {"schedule": "wsd", "warmup_steps": 2})
    (run / "cooldown-history.jsonl").write_text(json.dumps({"increment": 1, "steps": 2, "tokens": None}) + "\n"
                                                 + json.dumps({"increment": "two"}) + "\n", encoding="utf-8")
    result = cli("status", "--run", run)
    assert result.code == 0, result.text
    assert "last cooldown: increment 1: 2 steps off -, - tokens, - s, train loss - → -; not released yet" in result.text
