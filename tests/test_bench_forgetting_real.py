"""Fast tests of scripts/bench_forgetting_real.py: its plan (--dry-run), its arms and its measures.

The run itself trains a 135M model (a GPU for the full run, minutes of CPU for ``--smoke``), so it
is not run here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from olm_cli.recipe import recipe_from_dict

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


@pytest.fixture(scope="module")
def real():
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location("bench_forgetting_real", SCRIPTS / "bench_forgetting_real.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_runnable_arms_validate_and_skipped_ones_name_their_keys(real, tmp_path: Path) -> None:
    runnable, skipped = real.plan(real.FULL, ["naive", "replay25", "selfgen", "wsd"], cuda=True)
    assert {"naive", "replay25"} <= set(runnable)
    table = real.arms(real.FULL, str(tmp_path / "general.jsonl"))
    for name in runnable:
        base = real.base_recipe(real.FULL, start=tmp_path / "start", run_dir=tmp_path / name, shards="x/*.jsonl",
                                seed=0, cuda=True)
        recipe = recipe_from_dict(real.arm_recipe(base, table[name]))
        assert recipe.model.init == "pretrained" and recipe.run.mixed_precision == "bf16"
    replay = recipe_from_dict(real.arm_recipe(real.base_recipe(real.SMOKE, start=tmp_path, run_dir=tmp_path, shards="x",
                                                               seed=0, cuda=False), table["replay25"]))
    assert replay.replay.ratio == 0.25 and replay.replay.seed_from == [str(tmp_path / "general.jsonl")]
    assert replay.run.max_steps == 3 and replay.run.mixed_precision == "no"
    for name, needs in skipped.items():
        assert all(n.split("=")[0] in table[name] for n in needs), (name, needs)


def test_dry_run_prints_the_plan_as_json(real, capsys: pytest.CaptureFixture[str]) -> None:
    assert real.main(["--dry-run", "--json", "--arms", "naive,wsd"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["domains"] == ["drama", "code", "licences"] and plan["general"] == "general"
    assert "naive" in plan["runnable"] and set(plan["runnable"]) | set(plan["skipped"]) == {"naive", "wsd"}
    assert plan["meta"]["arms"]["naive"] == {}


def _rows(general: float, after: list[float], final: list[float]) -> list[dict[str, float]]:
    """Start (general 3.0, every domain 4.0), then three increments."""
    rows = [{"general": 3.0, "drama": 4.0, "code": 4.0, "licences": 4.0}]
    for i, d in enumerate(["drama", "code", "licences"]):
        row = {"general": general, "drama": final[0], "code": final[1], "licences": final[2]}
        row[d] = after[i]
        rows.append(row)
    return rows


def test_gains_and_targets(real) -> None:
    matrix = {
        "naive": _rows(3.3, [3.0, 3.0, 3.0], [3.5, 3.4, 3.0]),
        "replay25": _rows(3.02, [3.04, 3.02, 3.01], [3.2, 3.1, 3.01]),  # +0.67% general, gains 96-99% of naive's
        "wsd": _rows(3.05, [3.0, 3.0, 3.2], [3.3, 3.3, 3.2]),  # +1.7% general, 80% of naive's gain on licences
    }
    measures = real.gains_and_targets(matrix)
    assert measures["naive"]["gain"] == pytest.approx({"drama": 1.0, "code": 1.0, "licences": 1.0})
    assert measures["naive"]["forgetting"] == pytest.approx({"drama": 0.5, "code": 0.4})
    assert measures["replay25"]["general_change_pct"] == pytest.approx(100 * 0.02 / 3)
    assert measures["replay25"]["gain_kept_pct"]["drama"] == pytest.approx(96.0)
    targets = real.check_targets(measures, {"selfgen": ["replay.seed_from=generate"]})
    assert [(t["target"].split(":")[0], t["result"]) for t in targets] == [
        ("replay25", "PASS"), ("selfgen", "n/a"), ("wsd", "FAIL")]
    assert "licences 80%" in targets[2]["detail"]
