"""Fast tests of scripts/bench_forgetting.py's pure parts: recipes, budgets, matrix maths, targets.

The benchmark itself trains dozens of increments (minutes even with ``--smoke`` on a busy
2-core machine), so it is not run here; every piece of arithmetic that turns the engine's
matrices into the published table is.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

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
                             tokenizer=tmp_path / "tok", eval_sets={"code": "c.jsonl"}, seed=3)


def test_every_variant_is_a_valid_recipe(bench, tmp_path: Path) -> None:
    base = _base(bench, tmp_path)
    recipe_from_dict(base)  # the pre-training recipe
    for variant in bench.VARIANTS.values():
        recipe = recipe_from_dict(bench.variant_recipe(base, variant, run_dir=tmp_path / variant.name, shards="x/*"))
        assert recipe.run.seed == 3
        if variant.replay_ratio > 0:
            # The pre-training's buffer snapshot only loads with the same policy and unit.
            assert recipe.replay.policy == "reservoir" and recipe.replay.capacity_unit == "samples"
            assert recipe.replay.ratio == variant.replay_ratio
        else:
            assert recipe.replay.policy == "none"
    assert recipe_from_dict(bench.variant_recipe(base, bench.VARIANTS["lwf"], run_dir=tmp_path, shards="x")).distill.method == "lwf"
    ewc = recipe_from_dict(bench.variant_recipe(base, bench.VARIANTS["ewc"], run_dir=tmp_path, shards="x"))
    assert ewc.regularize.method == "ewc" and ewc.regularize.strength == 1000.0
    assert base["replay"]["ratio"] == 0.0  # pre-training stores the buffer but replays nothing


def test_set_dotted(bench) -> None:
    tree: dict = {"optim": {"lr": 1.0}}
    bench.set_dotted(tree, "optim.lr", 0.5)
    bench.set_dotted(tree, "distill.method", "lwf")
    assert tree == {"optim": {"lr": 0.5}, "distill": {"method": "lwf"}}


def test_replay_share_and_compute_equivalent_budget(bench) -> None:
    # the engine rounds ratio * batch stochastically, so the mean share is exact
    assert bench.replayed_per_step(0.01, 16) == pytest.approx(0.16)
    assert bench.replayed_per_step(0.05, 16) == pytest.approx(0.8)
    assert bench.replayed_per_step(0.25, 16) == 4
    assert bench.replayed_per_step(0.5, 16) == 8
    assert bench.new_token_budget(100 * 128, 0.05, 16, 128) == round(7 * 15.2 * 128)
    # 100 blocks of 128 tokens at batch 16 -> 7 naive steps; 25% replay leaves 12 new rows a step.
    assert bench.new_token_budget(100 * 128, 0.25, 16, 128) == 7 * 12 * 128
    assert bench.new_token_budget(100 * 128, 0.0, 16, 128) == 7 * 16 * 128


def test_prefix_within_counts_one_eos_per_document(bench) -> None:
    docs, lengths = ["a", "b", "c"], [4, 4, 4]
    assert bench.prefix_within(docs, lengths, 10) == ["a", "b"]
    assert bench.prefix_within(docs, lengths, 9) == ["a"]
    assert bench.prefix_within(docs, lengths, 4) == []


def _engine(rows):
    # The engine's matrix of a union run has an extra, empty "union" column.
    return {"domains": ["code", "prose", "drama", "union"], "rows": [r + [None] for r in rows]}


def test_combined_matrix_and_measures(bench) -> None:
    start = {"code": 7.0, "prose": 7.0, "drama": 7.0}
    engine = _engine([[3.0, 5.0, 6.0], [3.6, 3.0, 5.5], [4.0, 3.4, 3.2]])
    matrix = bench.combined_matrix(start, engine, ["code", "prose", "drama"])
    assert matrix.domains == ["code", "prose", "drama"]
    assert matrix.row_labels == ["start", "inc 1", "inc 2", "inc 3"]
    m = bench.run_measures(matrix, compute_tokens=1000, seconds=1.0)
    assert m["forgetting"] == pytest.approx({"code": 1.0, "prose": 0.4})
    assert m["mean_forgetting"] == pytest.approx(0.7)
    assert m["mean_loss"] == pytest.approx((4.0 + 3.4 + 3.2) / 3)
    assert m["new_domain_loss"] == pytest.approx((3.0 + 3.2) / 2)  # each continual domain right after its increment
    assert m["final"] == {"code": 4.0, "prose": 3.4, "drama": 3.2}


def test_combined_matrix_uses_the_engines_start_row(bench) -> None:
    engine = _engine([[6.5, 6.6, 6.7], [3.0, 5.0, 6.0], [3.6, 3.0, 5.5], [4.0, 3.4, 3.2]])
    engine["row_labels"] = ["start", "inc 1", "inc 2", "inc 3"]
    matrix = bench.combined_matrix({"code": 9.0, "prose": 9.0, "drama": 9.0}, engine, ["code", "prose", "drama"])
    assert matrix.rows[0] == [6.5, 6.6, 6.7] and len(matrix.rows) == 4
    assert matrix.trained_domain_per_row == [None, "code", "prose", "drama"]
    assert matrix.summary()["forgetting"] == pytest.approx({"code": 1.0, "prose": 0.4})


def _run(forget: float, new: float, mean: float, compute: int, spread: float = 0.0) -> list[dict]:
    return [{"final": {"code": mean, "prose": mean, "drama": mean}, "forgetting": {"code": forget + s, "prose": forget + s},
             "mean_forgetting": forget + s, "mean_loss": mean + s, "new_domain_loss": new, "compute_tokens": compute,
             "seconds": 1.0} for s in (-spread, spread)]


def test_aggregate_ratios_and_targets(bench) -> None:
    per_seed = {
        "naive": _run(1.0, 3.0, 4.0, 100),
        "replay5": _run(0.8, 3.0, 3.9, 100),
        "replay25": _run(0.3, 3.05, 3.7, 100, spread=0.1),
        "replay50": _run(0.1, 3.2, 3.52, 100),
        "union": _run(0.05, 3.0, 3.5, 500),
        "best": _run(0.15, 3.03, 3.53, 100),
    }
    agg = bench.aggregate(per_seed)
    assert agg["replay25"]["mean_forgetting"][0] == pytest.approx(0.3)
    assert agg["replay25"]["mean_forgetting"][1] == pytest.approx(0.1414, abs=1e-3)  # sample std of 0.2, 0.4
    assert agg["replay25"]["forgetting_reduction_pct"] == pytest.approx(70.0)
    assert agg["replay25"]["new_domain_change_pct"] == pytest.approx(100 * 0.05 / 3)
    assert agg["replay50"]["mean_loss_vs_union"] == pytest.approx(3.52 / 3.5)
    assert agg["best"]["compute_vs_union"] == pytest.approx(0.2)
    results = {t["target"].split(":")[0]: t["result"] for t in bench.check_targets(agg)}
    assert list(results.values()) == ["PASS", "PASS", "PASS", "PASS"]

    per_seed["replay5"] = _run(1.2, 3.0, 4.0, 100)  # more forgetting than naive breaks the chain
    per_seed["best"] = _run(0.15, 3.2, 3.53, 100)  # new-domain loss +6.7%
    targets = bench.check_targets(bench.aggregate(per_seed))
    assert [t["result"] for t in targets] == ["FAIL", "PASS", "PASS", "FAIL"]


def test_targets_without_their_variants_are_not_applicable(bench) -> None:
    agg = bench.aggregate({"naive": _run(1.0, 3.0, 4.0, 100), "replay25": _run(0.2, 3.0, 3.8, 100)})
    assert [t["result"] for t in bench.check_targets(agg)] == ["n/a", "PASS", "n/a", "n/a"]


def test_no_naive_forgetting_fails_instead_of_crashing(bench) -> None:
    agg = bench.aggregate({"naive": _run(-0.1, 3.0, 4.0, 100), "replay25": _run(-0.2, 3.0, 3.8, 100)})
    assert agg["replay25"]["forgetting_reduction_pct"] is None
    target = bench.check_targets(agg)[1]
    assert target["result"] == "FAIL" and "forgot nothing" in target["detail"]


def test_table_and_docs_section_keep_other_sections(bench, tmp_path: Path) -> None:
    agg = bench.aggregate({"naive": _run(1.0, 3.0, 4.0, 100), "union": _run(0.1, 3.0, 3.5, 300)})
    header, rows = bench.table_rows(agg, ["code", "prose", "drama"])
    assert len(header) == len(rows[0]) and rows[0][0] == "naive sequential"
    assert rows[1][-1] == "1.000" and rows[0][-1] == "0.333"
    meta = {"command": "python scripts/bench_forgetting.py", "date": "2030-01-01", "minutes": 1.0, "seeds": [0],
            "settings": bench.FULL, "notes": ["a note"]}
    section = bench.docs_section(agg, ["code", "prose", "drama"], bench.check_targets(agg), meta)
    assert section.startswith("## Forgetting\n") and "2 CPU cores" in section and "a note" in section

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Throughput\n\nfast\n\n## Forgetting\n\nSTALE-TABLE\n\n## Selectors\n\nkept\n")
    bench.write_docs(docs, section)
    text = docs.read_text()
    assert "## Throughput\n\nfast" in text and "## Selectors\n\nkept" in text and "STALE-TABLE" not in text
    assert text.index("## Throughput") < text.index("## Forgetting") < text.index("## Selectors")
    bench.write_docs(docs, section)
    assert docs.read_text() == text  # idempotent

    fresh = tmp_path / "new.md"
    bench.write_docs(fresh, section)
    assert fresh.read_text().startswith("# Benchmarks\n\n## Forgetting\n")
