"""``olm report``: the gathered data, the figures drawn from it, the page, and a real render.

The fast tests build a run directory by hand through olm's own writers (the ledger, the matrix,
append-only logs), so every number the report should show is known; the slow ones train real
increments with ``eval.report: true`` and render the page in headless Chromium.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import add_shard, make_documents, tiny_recipe, write_jsonl, write_recipe
from e2e_helpers import cli

from olm_cli.errors import RecipeError
from olm_cli.evaluation.matrix import ContinualMatrix
from olm_cli.report import DATA_FILE, PAGE_FILE, refresh_after_increment, write_report
from olm_cli.report.sources import gather, read_previous, training_series
from olm_cli.rundir.atomic import append_line_durable
from olm_cli.rundir.ledger import ShardLedger

matplotlib_image = pytest.importorskip("matplotlib.image")


# --------------------------------------------------------------------------- a run made by hand


def _metrics_rows() -> list[dict[str, Any]]:
    rows = []
    for increment, (first, last) in ((1, (1, 10)), (2, (11, 16))):
        for step in range(first, last + 1):
            rows.append({"step": step, "increment": increment, "increment_step": step - first + 1,
                         "loss": 6.0 - 0.1 * step, "lr": 1e-3, "tokens": 128 * step, "tokens_per_s": 1000.0 + step,
                         "batch_size": 4, "replayed": 0 if increment == 1 else 1, "time": 1.7e9 + step})
    # A skipped batch is logged under the step it would have been; the retry takes the number.
    rows.insert(12, {"step": 13, "increment": 2, "increment_step": 3, "skipped": True, "loss": None,
                     "grad_norm": None, "reason": "non-finite loss", "nonfinite": ["loss"]})
    return rows


def make_run(tmp_path: Path) -> Path:
    """A run directory of two increments over domains alpha then beta, one release refused."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path)), encoding="utf-8")
    with open(run / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for row in _metrics_rows():
            handle.write(json.dumps(row) + "\n")
        handle.write('{"step": 17, "incre')  # a line torn by a kill: skipped

    matrix = ContinualMatrix()
    matrix.add_row("start", None, {"alpha": 5.0, "beta": 5.0})
    matrix.add_row("inc 1", "alpha", {"alpha": 3.0, "beta": 4.5})
    matrix.add_row("inc 2", "beta", {"alpha": 3.5, "beta": 2.5})
    matrix.save(run / "eval" / "matrix.json")
    for increment, (alpha, beta) in enumerate(((5.0, 5.0), (3.0, 4.5), (3.5, 2.5))):
        row: dict[str, Any] = {"increment": increment, "step": 10 * increment, "time": 1.7e9,
                               "domains": {"alpha": {"loss": alpha, "perplexity": 2.0, "tokens": 100},
                                           "beta": {"loss": beta, "perplexity": 2.0, "tokens": 100}}}
        if increment:
            row["tasks"] = {"toy_mc": {"acc": 0.25 * increment}}
        append_line_durable(run / "eval" / "history.jsonl", json.dumps(row))

    ledger = ShardLedger(run / "ledger.json")
    shards = []
    for name in ("alpha-0.jsonl", "beta-0.jsonl", "beta-1.jsonl"):
        shards.append(write_jsonl(tmp_path / "stream" / name, make_documents(name.split("-")[0], 4, 0)))
    ledger.scan(shards)
    ledger.start_increment()
    ledger.mark_in_progress(shards[0], 1)
    ledger.add_tokens(shards[0], 1280)
    ledger.mark_done(shards[0])
    ledger.start_increment()
    for path in shards[1:]:
        ledger.mark_in_progress(path, 2)
    ledger.add_tokens(shards[1], 600)
    ledger.mark_done(shards[1])
    ledger.add_tokens(shards[2], 40)
    ledger.quarantine(shards[2], "line 3: not valid JSON")
    ledger.save()

    releases = run / "releases"
    for increment, released in ((1, True), (2, False)):
        append_line_durable(releases / "history.jsonl", json.dumps({
            "release": f"release-{increment:04d}", "increment": increment, "step": 10 * increment,
            "released": released, "reasons": [] if released else ["beta loss rose 9% over release-0001, budget 2%"],
            "gate": {}, "created": "2026-03-01T02:00:00+00:00", "previous": None if increment == 1 else "release-0001",
            "latest": "release-0001"}))
    return run


def _images(page: str) -> dict[str, bytes]:
    """The PNGs embedded in the page, by figure id."""
    found = re.findall(r'<figure id="fig-(\w+)"[^>]*><img src="data:image/png;base64,([^"]+)"', page)
    return {name: base64.b64decode(data) for name, data in found}


def _not_blank(png: bytes) -> float:
    pixels = matplotlib_image.imread(io.BytesIO(png))
    return float(np.asarray(pixels)[..., :3].std())


# --------------------------------------------------------------------------- gathered data


def test_gather_reads_every_source_of_the_run(tmp_path: Path) -> None:
    data = gather(make_run(tmp_path))

    training = data["training"]
    assert training["logged_steps"] == 16 and training["step"] == list(range(1, 17))
    assert sorted(set(training["increment"])) == [1, 2]
    assert training["skipped"] == [{"step": 13, "increment": 2, "reason": "non-finite loss"}]
    by_increment = {row["increment"]: row for row in data["increments"]}
    assert by_increment[1]["replay_share"] == 0.0 and by_increment[2]["replay_share"] == pytest.approx(0.25)
    assert by_increment[2]["skipped_steps"] == 1 and by_increment[2]["last_step"] == 16

    matrix = data["eval"]["matrix"]
    assert matrix["row_labels"] == ["start", "inc 1", "inc 2"]
    assert matrix["summary"]["forgetting"] == {"alpha": pytest.approx(0.5)}
    # A downstream metric in the history is found without knowing its name; domain losses are not extra.
    assert data["eval"]["extra_metrics"] == {"tasks/toy_mc/acc": [
        {"increment": 1, "step": 10, "value": 0.25}, {"increment": 2, "step": 20, "value": 0.5}]}

    ledger = data["ledger"]
    assert ledger["counts"]["quarantined"] == 1 and ledger["tokens"] == 1920
    assert ledger["tokens_per_increment"] == {"1": {"done": 1280}, "2": {"done": 600, "quarantined": 40}}
    assert [r["released"] for r in data["releases"]] == [True, False]
    assert data["replay"]["share"] == {"1": 0.0, "2": pytest.approx(0.25)}


def test_long_runs_are_thinned_but_keep_each_increments_last_step() -> None:
    rows = [{"step": s, "increment": 1 + s // 5000, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0}
            for s in range(1, 12001)]
    series = training_series(rows, limit=1000)
    assert series["logged_steps"] == 12000 and series["shown_steps"] <= 1003
    assert {4999, 9999, 12000} <= set(series["step"])
    assert series["step"] == sorted(series["step"])


def test_the_eval_file_names_are_the_evaluation_packages() -> None:
    from olm_cli.evaluation import domains
    from olm_cli.report import sources

    assert (sources.MATRIX_FILE, sources.HISTORY_FILE) == (domains.MATRIX_FILE, domains.HISTORY_FILE)


# --------------------------------------------------------------------------- the page


@pytest.mark.slow  # six figures: over a second on a busy 2-core machine
def test_page_figures_match_the_data(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    result = write_report(run)

    assert result.page == run / "report" / PAGE_FILE
    page = result.page.read_text(encoding="utf-8")
    assert "<script" not in page and "http://" not in page and "https://" not in page  # self-contained
    images = _images(page)
    assert set(images) == {"training", "eval", "matrix", "extra", "replay", "ledger"}
    for name, png in images.items():
        assert _not_blank(png) > 0.05, name

    written = json.loads((run / "report" / DATA_FILE).read_text(encoding="utf-8"))
    figures = written["figures"]
    assert figures["training"]["increments"] == [1, 2] and figures["training"]["points"] == 16
    assert figures["eval"]["rows"] == ["start", "inc 1", "inc 2"] and figures["eval"]["rejected"] == [2]
    assert figures["matrix"]["domains"] == ["alpha", "beta"]
    assert figures["extra"]["metrics"] == ["tasks/toy_mc/acc"]
    assert 'data-increments="[1, 2]"' in page
    assert "over 16 logged steps (steps 1 to 16), 2 increments (1, 2); 1 skipped batch marked in red" in page
    assert "not released" in page and "beta loss rose 9% over release-0001, budget 2%" in page
    assert "line 3: not valid JSON" in page  # the quarantined shard, listed first
    assert page.index("quarantined</span>") < page.index("alpha-0.jsonl")


def test_an_empty_run_says_what_is_missing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe(tmp_path)), encoding="utf-8")
    result = write_report(run)

    page = result.page.read_text(encoding="utf-8")
    assert _images(page) == {}
    assert "No training step logged yet" in page
    assert "No evaluation yet: set eval.sets in the recipe" in page
    assert "No release yet" in page and "No shard in the ledger yet" in page
    assert all(figure is None for figure in result.data["figures"].values())


def test_an_unreadable_source_is_a_problem_line_and_the_rest_is_shown(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    (run / "ledger.json").write_text("{not json", encoding="utf-8")
    (run / "eval" / "matrix.json").write_text('{"domains": ["alpha"], "rows": [[1.0, 2.0]]}', encoding="utf-8")
    data = gather(run)
    assert any("ledger" in p and "corrupt" in p for p in data["problems"])
    assert any("matrix.json cannot be read" in p for p in data["problems"])
    assert data["ledger"]["shards"] == [] and data["eval"]["matrix"] is None
    assert data["training"]["logged_steps"] == 16  # the rest is still gathered


def test_not_a_run_directory_is_one_line(tmp_path: Path) -> None:
    result = cli("report", "--run", tmp_path)
    assert result.code == 1
    assert result.err.strip() == f"error: {tmp_path}: not an olm run directory (no recipe.yaml); run `olm train` first"
    assert cli("report", "--run", tmp_path / "missing").code == 1


def test_out_never_replaces_a_users_file_without_force(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "published"
    out.mkdir()
    (out / PAGE_FILE).write_text("mine", encoding="utf-8")

    refused = cli("report", "--run", run, "--out", out)
    assert refused.code == 2
    assert refused.err.strip() == f"error: --out {out}: index.html already exist(s) there; pass --force to replace them"
    assert (out / PAGE_FILE).read_text(encoding="utf-8") == "mine"
    (out / PAGE_FILE).unlink()
    (out / DATA_FILE).symlink_to(tmp_path / "elsewhere.json")  # a link counts as a file there
    assert cli("report", "--run", run, "--out", out).code == 2
    assert cli("report", "--run", run, "--out", tmp_path / "published" / DATA_FILE).code == 2  # not a directory


@pytest.mark.slow
def test_force_replaces_and_json_prints_the_gathered_data(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    out = tmp_path / "published"
    out.mkdir()
    (out / PAGE_FILE).write_text("mine", encoding="utf-8")
    result = cli("report", "--run", run, "--out", out, "--force", "--json")
    assert result.code == 0, result.text
    assert (out / PAGE_FILE).read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    data = result.json()
    assert data["page"] == str(out / PAGE_FILE)
    assert data["figures"]["training"]["increments"] == [1, 2]
    assert data["ledger"]["counts"]["quarantined"] == 1
    assert json.loads((out / DATA_FILE).read_text(encoding="utf-8"))["ledger"] == data["ledger"]


def test_composition_of_pruned_checkpoints_is_kept_from_the_previous_report(tmp_path: Path) -> None:
    run = make_run(tmp_path)
    earlier = {"format": 1, "replay": {"composition": {"1": {"checkpoint": "step-00000010", "by_domain": {"alpha": 7}}}}}
    (run / "report").mkdir()
    (run / "report" / DATA_FILE).write_text(json.dumps(earlier), encoding="utf-8")
    data = gather(run, previous=read_previous(run / "report" / DATA_FILE))
    assert data["replay"]["composition"] == earlier["replay"]["composition"]
    assert read_previous(run / "report" / "missing.json") is None


def test_a_report_that_fails_is_a_warning_line(tmp_path: Path) -> None:
    said: list[str] = []
    assert refresh_after_increment(tmp_path / "gone", say=said.append) is None
    assert said == [f"warning: report not regenerated: run directory {tmp_path / 'gone'} does not exist"]


def test_eval_report_without_matplotlib_is_a_recipe_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from olm_cli.recipe import load_recipe

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    path = write_recipe(tmp_path, tiny_recipe(tmp_path, eval={"report": True}))
    with pytest.raises(RecipeError, match=r"eval\.report.*needs matplotlib.*pip install 'olm\[report\]'"):
        load_recipe(path)
    # A run's own recipe.yaml still loads there (olm eval, olm status on a copied run).
    run_recipe = tmp_path / "run-recipe.yaml"
    shutil.copy(path, run_recipe)
    assert load_recipe(run_recipe, written_by_olm=True).eval.report is True


# --------------------------------------------------------------------------- real runs, a real browser


def _train_two_nights(tmp_path: Path) -> Path:
    sets = {d: str(write_jsonl(tmp_path / "eval" / f"{d}.jsonl", make_documents(d, 8, 99))) for d in ("alpha", "beta")}
    recipe = write_recipe(tmp_path, tiny_recipe(
        tmp_path, replay={"policy": "reservoir", "capacity": 200, "ratio": 0.25},
        eval={"sets": sets, "max_tokens": 1000, "report": True}, run={"max_steps": 8}))
    for night, domain in enumerate(("alpha", "beta")):
        add_shard(tmp_path / "stream", domain, night)
        result = cli("train", "--config", recipe)
        assert result.code == 0, result.text
        assert result.has(f"report → {tmp_path / 'run' / 'report' / PAGE_FILE}")
    return tmp_path / "run"


@pytest.mark.slow
def test_eval_report_regenerates_after_every_increment(tmp_path: Path) -> None:
    run = _train_two_nights(tmp_path)
    data = json.loads((run / "report" / DATA_FILE).read_text(encoding="utf-8"))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert data["figures"]["training"]["increments"] == sorted({row["increment"] for row in metrics}) == [1, 2]
    assert data["figures"]["training"]["points"] == len(metrics)
    assert data["eval"]["matrix"]["row_labels"] == ["start", "inc 1", "inc 2"]
    assert [r["release"] for r in data["releases"]] == ["release-0001", "release-0002"]
    assert set(data["replay"]["composition"]) == {"1", "2"}
    assert data["replay"]["share"]["2"] > 0


@pytest.mark.slow
def test_a_report_that_cannot_be_drawn_never_fails_the_night(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import olm_cli.report.figures

    def broken(data: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("no fonts here")

    monkeypatch.setattr(olm_cli.report.figures, "all_figures", broken)
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = write_recipe(tmp_path, tiny_recipe(tmp_path, eval={"report": True}, run={"max_steps": 4}))
    result = cli("train", "--config", recipe)
    assert result.code == 0, result.text
    assert result.has("warning: report not regenerated: no fonts here")
    assert (tmp_path / "run" / "releases" / "latest").is_dir()
    assert not (tmp_path / "run" / "report" / PAGE_FILE).exists()


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed and could not be (scripts/test.sh installs the Debian package "
                    "`chromium` where apt-get is available)")
    return binary


@pytest.mark.slow
def test_the_page_renders_in_headless_chromium(tmp_path: Path) -> None:
    browser = _chromium()
    run = _train_two_nights(tmp_path)
    page = (run / "report" / PAGE_FILE).read_text(encoding="utf-8")
    shot = tmp_path / "screenshot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1440,2400",
                    (run / "report" / PAGE_FILE).as_uri()],
                   check=True, capture_output=True, timeout=120)

    pixels = np.asarray(matplotlib_image.imread(str(shot)))[..., :3]
    assert pixels.shape[:2] == (2400, 1440)
    assert pixels.std() > 0.05  # not a blank page
    # The figures' area (the top half, below the header) is drawn, not an empty white block.
    assert (pixels[200:1200].min(axis=2) < 0.9).mean() > 0.05
    images = _images(page)
    assert {"training", "eval", "matrix", "replay", "ledger"} <= set(images)
    assert 'data-increments="[1, 2]"' in page
    assert "over 3 evaluations (start, inc 1, inc 2)" in page
