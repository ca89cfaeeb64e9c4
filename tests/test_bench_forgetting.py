"""Fast tests of scripts/bench_forgetting.py's pure parts: arms, skip detection, entropy, measures, targets.

The benchmark itself trains dozens of increments (minutes even with ``--quick`` on a busy 2-core
machine), so it is not run here; every piece that decides what runs and turns the evaluated
releases into the published table is.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from olm_cli.errors import RecipeError
from olm_cli.evaluation.matrix import ContinualMatrix
from olm_cli.recipe import recipe_from_dict

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_forgetting.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_forgetting", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _base(bench, tmp_path: Path) -> dict:
    return bench.base_recipe(bench.FULL, run_dir=tmp_path / "run", shards=str(tmp_path / "s" / "*.jsonl"),
                             tokenizer=tmp_path / "tok", seed=3)


def test_every_runnable_arm_is_a_valid_recipe_and_the_others_name_their_keys(bench, tmp_path: Path) -> None:
    base = _base(bench, tmp_path)
    recipe_from_dict(base)  # the pre-training recipe
    assert base["replay"]["ratio"] == 0.0  # pre-training stores the buffer but replays nothing
    runnable, skipped = bench.plan_arms(list(bench.ARMS), bench.FULL)
    assert set(runnable) | set(skipped) == set(bench.ARMS) and not set(runnable) & set(skipped)
    assert {"naive", "replay25", "lwf", "union"} <= set(runnable)  # keys every olm since 0.2 knows
    for name in runnable:
        arm = bench.ARMS[name]
        recipe = recipe_from_dict(bench.arm_recipe(base, arm, run_dir=tmp_path / name, shards="x/*"))
        assert recipe.run.seed == 3
        if arm.uses_replay:
            # The pre-training's buffer snapshot only loads with the same policy and unit.
            assert recipe.replay.policy == "reservoir" and recipe.replay.capacity_unit == "samples"
        else:
            assert recipe.replay.policy == "none"
    for name, needs in skipped.items():
        # Every key a skipped arm needs is one of its own overrides.
        assert needs and all(n.split("=")[0] in bench.ARMS[name].overrides for n in needs), (name, needs)


def test_missing_keys_reports_unknown_keys_and_values(bench, tmp_path: Path) -> None:
    base = _base(bench, tmp_path)
    overrides = {"optim.schedule": "no-such-schedule", "optim.no_such_key": 1}
    recipe = bench.arm_recipe(base, bench.Arm("x", "x", overrides), run_dir=tmp_path, shards="x/*")
    assert bench.missing_keys(recipe, overrides) == ["optim.schedule=no-such-schedule", "optim.no_such_key"]
    nested = {"optim.no_such_section": {"method": "a"}}
    recipe = bench.arm_recipe(base, bench.Arm("x", "x", nested), run_dir=tmp_path, shards="x/*")
    assert bench.missing_keys(recipe, nested) == ["optim.no_such_section"]
    assert bench.missing_keys(base, {}) == []


def test_a_broken_key_the_arm_does_not_override_is_raised(bench, tmp_path: Path) -> None:
    base = _base(bench, tmp_path)
    base["batch"]["size"] = -1  # the benchmark's own bug, not a missing feature
    with pytest.raises(RecipeError, match="batch.size"):
        bench.missing_keys(base, {"optim.schedule": "wsd"})


def test_set_dotted(bench) -> None:
    tree: dict = {"optim": {"lr": 1.0}}
    bench.set_dotted(tree, "optim.lr", 0.5)
    bench.set_dotted(tree, "distill.method", "lwf")
    assert tree == {"optim": {"lr": 0.5}, "distill": {"method": "lwf"}}


def test_unigram_entropy(bench) -> None:
    # Two documents [1, 2] and [1, 1] with EOS 0: counts 1 -> 3, 2 -> 1, 0 -> 2 out of 6.
    expected = -sum(p * math.log(p) for p in (3 / 6, 1 / 6, 2 / 6))
    assert bench.unigram_entropy([[1, 2], [1, 1]], eos_id=0) == pytest.approx(expected)
    assert bench.unigram_entropy([[5, 5, 5]], eos_id=5) == 0.0  # one symbol: nothing to guess


def _matrix(rows: list[dict]) -> ContinualMatrix:
    matrix = ContinualMatrix()
    for label, trained, losses in rows:
        matrix.add_row(label, trained, losses)
    return matrix


def test_measures_from_the_matrix(bench) -> None:
    matrix = _matrix([
        ("start", None, {"code": 6.0, "prose": 6.0, "drama": 6.0}),
        ("base", "code", {"code": 3.0, "prose": 5.0, "drama": 6.0}),
        ("inc 2", "prose", {"code": 3.6, "prose": 3.0, "drama": 5.5}),
        ("inc 3", "drama", {"code": 4.0, "prose": 3.4, "drama": 3.2}),
    ])
    m = bench.run_measures(matrix, compute_tokens=1000, seconds=1.0)
    assert m["forgetting"] == pytest.approx({"code": 1.0, "prose": 0.4})
    assert m["mean_forgetting"] == pytest.approx(0.7)
    assert m["mean_loss"] == pytest.approx((4.0 + 3.4 + 3.2) / 3)
    assert m["new_domain_loss"] == pytest.approx((3.0 + 3.2) / 2)  # each continual domain right after its increment
    assert m["final"] == {"code": 4.0, "prose": 3.4, "drama": 3.2}
    json.dumps(m)  # what --json writes


def _run(forget: float, new: float, mean: float, compute: int, spread: float = 0.0) -> list[dict]:
    return [{"final": {"code": mean, "prose": mean, "drama": mean}, "forgetting": {"code": forget + s, "prose": forget + s},
             "mean_forgetting": forget + s, "mean_loss": mean + s, "new_domain_loss": new, "compute_tokens": compute,
             "seconds": 1.0} for s in (-spread, spread)]


BASE = [{"seed": 0, "loss": 3.0, "unigram_entropy": 5.0}, {"seed": 1, "loss": 3.4, "unigram_entropy": 5.0}]


def test_aggregate_ratios_and_targets(bench) -> None:
    per_seed = {
        "naive": _run(1.0, 3.0, 4.0, 100),
        "replay5": _run(0.8, 3.0, 3.9, 100),
        "replay25": _run(0.3, 3.05, 3.7, 133, spread=0.1),
        "replay50": _run(0.1, 3.2, 3.52, 200),
        "wsd_equal": _run(0.9, 2.9, 3.9, 100),
        "union": _run(0.05, 3.0, 3.5, 500),
        "best": _run(0.15, 3.03, 3.53, 120),
    }
    agg = bench.aggregate(per_seed)
    assert agg["replay25"]["mean_forgetting"][0] == pytest.approx(0.3)
    assert agg["replay25"]["mean_forgetting"][1] == pytest.approx(0.1414, abs=1e-3)  # sample std of 0.2, 0.4
    assert agg["replay25"]["forgetting_reduction_pct"] == pytest.approx(70.0)
    assert agg["replay25"]["new_domain_change_pct"] == pytest.approx(100 * 0.05 / 3)
    assert agg["replay25"]["compute_vs_naive"] == pytest.approx(1.33)
    assert agg["best"]["mean_loss_vs_union"] == pytest.approx(3.53 / 3.5)
    assert agg["best"]["compute_vs_union"] == pytest.approx(0.24)
    targets = bench.check_targets(agg, BASE, {})
    assert [t["result"] for t in targets] == ["PASS"] * 7
    assert "gap 1.600" in targets[0]["detail"]

    per_seed["best"] = _run(0.15, 3.2, 3.56, 300)  # new-domain loss +6.7%, 1.017x union, 0.6x its compute
    per_seed["wsd_equal"] = _run(0.9, 2.9, 3.9, 120)  # better, but at 1.2x naive's compute
    base = BASE + [{"seed": 2, "loss": 3.6, "unigram_entropy": 5.0}]  # gap 1.4 < 1.5
    targets = bench.check_targets(bench.aggregate(per_seed), base, {})
    assert [t["result"] for t in targets] == ["FAIL", "PASS", "FAIL", "FAIL", "FAIL", "PASS", "FAIL"]


def test_targets_of_skipped_or_absent_arms_are_not_applicable(bench) -> None:
    agg = bench.aggregate({"naive": _run(1.0, 3.0, 4.0, 100), "replay25": _run(0.2, 3.0, 3.8, 100)})
    targets = bench.check_targets(agg, [], {"best": ["replay.mode=displace"]})
    assert [t["result"] for t in targets] == ["n/a"] * 6  # no base entry without a base measured
    assert targets[0]["detail"] == "best skipped: needs replay.mode=displace"
    assert "union not run" in targets[2]["detail"]


def test_no_naive_forgetting_fails_instead_of_crashing(bench) -> None:
    agg = bench.aggregate({"naive": _run(-0.1, 3.0, 4.0, 100), "best": _run(-0.2, 3.0, 3.8, 100)})
    assert agg["best"]["forgetting_reduction_pct"] is None
    target = bench.check_targets(agg, [], {})[0]
    assert target["result"] == "FAIL" and "forgot nothing" in target["detail"]


def test_table_lists_skipped_arms_and_the_docs_section(bench) -> None:
    agg = bench.aggregate({"naive": _run(1.0, 3.0, 4.0, 100), "union": _run(0.1, 3.0, 3.5, 300)})
    skipped = {"wsd_cooldown": ["optim.schedule=wsd"]}
    header, rows = bench.table_rows(agg, ["code", "prose", "drama"], skipped)
    assert all(len(r) == len(header) for r in rows)
    assert rows[0][0] == "naive cosine" and rows[1][-1] == "1.000" and rows[0][-1] == "0.333"
    assert rows[2][:2] == ["WSD + cooldown 20% (on top)", "skipped: needs optim.schedule=wsd"]
    meta = {"command": "python scripts/bench_forgetting.py", "date": "2030-01-01", "minutes": 1.0, "seeds": [0],
            "settings": bench.FULL}
    section = bench.docs_section(agg, ["code", "prose", "drama"], bench.check_targets(agg, BASE, skipped), skipped, meta)
    assert "2 CPU cores" in section and "skipped: needs optim.schedule=wsd" in section and "**PASS** base learned" in section


def test_parse_args_defaults_and_errors(bench) -> None:
    quick = bench.parse_args(["--quick"])
    assert quick.seeds == "0" and quick.arms == bench.QUICK_ARMS
    full = bench.parse_args([])
    assert full.seeds == "0,1,2" and full.arms.split(",") == [n for n, a in bench.ARMS.items() if a.default]
    assert "const_sma" not in full.arms.split(",") and "naive" in full.arms.split(",")
    with pytest.raises(SystemExit):
        bench.parse_args(["--arms", "naive,nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--seeds", "a,b"])


def test_report_re_aggregates_a_results_file_with_another_best(bench, tmp_path: Path, capsys) -> None:
    saved = {"meta": {"command": "c", "date": "d", "minutes": 1.0, "seeds": [0, 1], "settings": bench.FULL},
             "domains": ["code", "prose", "drama"], "base": BASE, "skipped": {"best": ["optim.schedule=wsd"]},
             "per_seed": {"naive": _run(1.0, 3.0, 4.0, 100), "replay50": _run(0.1, 3.03, 3.52, 150),
                          "union": _run(0.05, 3.0, 3.5, 500)}}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(saved))
    assert bench.main(["--report", str(path), "--best", "replay50", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["meta"]["best"] == "replay50"
    assert [t["result"] for t in out["targets"][:5]] == ["PASS", "PASS", "PASS", "PASS", "PASS"]
    assert out["aggregate"]["replay50"]["compute_vs_union"] == pytest.approx(0.3)
    path.write_text("{}")
    assert bench.main(["--report", str(path)]) == 2


def test_cooldown_tokens_count_only_that_increments_branch(bench, tmp_path: Path) -> None:
    assert bench.cooldown_tokens(tmp_path, 2) == 0  # no cooldown: nothing to add
    lines = [{"increment": 2, "tokens": 5120}, {"increment": 3, "tokens": 4096}]
    (tmp_path / "cooldown-history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bench.cooldown_tokens(tmp_path, 2) == 5120 and bench.cooldown_tokens(tmp_path, 3) == 4096
    assert bench.cooldown_tokens(tmp_path, 4) == 0


def test_equal_compute_trunk_fills_naive_steps_with_its_cooldown(bench) -> None:
    from olm_cli.schedule import cooldown_steps

    for naive in (3, 5, 7, 12, 23, 24, 25, 30, 97):
        trunk = bench.equal_compute_trunk_steps(naive, 0.2)
        assert trunk + cooldown_steps(trunk, 0.2) <= naive  # never more compute than naive
        assert trunk + 1 + cooldown_steps(trunk + 1, 0.2) > naive  # and the largest trunk that fits
    assert bench.equal_compute_trunk_steps(24, 0.2) == 20  # 20 trunk + 4 cooldown
    assert bench.equal_compute_trunk_steps(1, 0.2) == 1  # the floor: one trunk step (and its one cooldown step)


def test_new_arms_plan_as_valid_recipes(bench, tmp_path: Path) -> None:
    base = _base(bench, tmp_path)
    runnable, skipped = bench.plan_arms(["naive", "wsd_equal", "selfgen", "reptile", "replay5_displace",
                                         "replay50_displace", "best"], bench.FULL)
    assert not skipped, skipped
    selfgen = recipe_from_dict(bench.arm_recipe(base, bench.ARMS["selfgen"], run_dir=tmp_path / "s", shards="x/*"))
    assert selfgen.replay.seed_from == "generate" and selfgen.replay.generate.samples == 256
    assert bench.ARMS["selfgen"].from_release and not bench.ARMS["naive"].from_release
    wsd = recipe_from_dict(bench.arm_recipe(base, bench.ARMS["wsd_equal"], run_dir=tmp_path / "w", shards="x/*"))
    assert wsd.optim.schedule == "wsd" and bench.ARMS["wsd_equal"].equal_compute
    best = recipe_from_dict(bench.arm_recipe(base, bench.ARMS["best"], run_dir=tmp_path / "b", shards="x/*"))
    assert best.replay.mode == "displace" and best.distill.method == "lwf"
    reptile = recipe_from_dict(bench.arm_recipe(base, bench.ARMS["reptile"], run_dir=tmp_path / "r", shards="x/*"))
    assert reptile.optim.meta.method == "reptile"


def test_an_equal_compute_arm_needs_naive(bench) -> None:
    with pytest.raises(SystemExit):
        bench.parse_args(["--arms", "wsd_equal"])
    assert bench.parse_args(["--arms", "naive,wsd_equal"]).arms == "naive,wsd_equal"


def test_list_arms_names_every_arm(bench, capsys) -> None:
    assert bench.main(["--list-arms"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(bench.ARMS)
    assert all(" runs " in line for line in lines)  # every key the benchmark uses is known to this olm
    assert [line.split()[0] for line in lines if "(only by name)" in line] == ["wsd_cooldown", "const_sma", "lwf_displace15", "lwf_add10"]
