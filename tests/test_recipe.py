from __future__ import annotations

from pathlib import Path

import pytest
from conftest import tiny_recipe, write_recipe

from olm_cli.errors import EXIT_USAGE, RecipeError
from olm_cli.recipe import load_recipe, parse_override, recipe_from_dict


def test_valid_recipe_resolves_defaults_and_relative_paths(tmp_path: Path) -> None:
    recipe_dict = tiny_recipe(tmp_path)
    recipe_dict["data"]["shards"] = ["stream/*/*.jsonl"]
    recipe_dict["run"]["dir"] = "runs/x"
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict))
    assert recipe.data.shards == [str(tmp_path / "stream/*/*.jsonl")]
    assert recipe.run.dir == str(tmp_path / "runs/x")
    assert recipe.selector.name == "random"
    assert recipe.optim.schedule == "cosine"


def test_all_errors_reported_at_once_with_paths_and_did_you_mean(tmp_path: Path) -> None:
    recipe_dict = tiny_recipe(tmp_path)
    recipe_dict["optim"]["lrr"] = 0.1
    recipe_dict["run"]["seed"] = "not-a-number"
    recipe_dict["data"]["block_size"] = -3
    recipe_dict["modle"] = {}
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe_dict))
    message = str(info.value)
    assert info.value.exit_code == EXIT_USAGE
    assert "4 problem(s)" in message
    assert "optim.lrr: unknown key; did you mean `lr`?" in message
    assert "modle: unknown key; did you mean `model`?" in message
    assert "run.seed:" in message
    assert "data.block_size:" in message


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  init: scratch\n data: [unclosed\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"bad\.yaml:\d+:\d+: malformed YAML"):
        load_recipe(path)


def test_missing_and_non_mapping_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n", encoding="utf-8")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(path)


def test_overrides_apply_with_types(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    recipe = load_recipe(path, ["optim.lr=3e-4", "run.dir=/tmp/elsewhere", "replay.policy=reservoir", "replay.ratio=0.25"])
    assert recipe.optim.lr == pytest.approx(3e-4)
    assert recipe.run.dir == "/tmp/elsewhere"
    assert recipe.replay.policy == "reservoir"
    assert recipe.replay.ratio == 0.25


def test_override_errors(tmp_path: Path) -> None:
    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    with pytest.raises(RecipeError, match="not KEY=VALUE"):
        load_recipe(path, ["optim.lr"])
    with pytest.raises(RecipeError, match="optim.lrr: unknown key; did you mean `lr`"):
        load_recipe(path, ["optim.lrr=1"])
    with pytest.raises(RecipeError, match="`lr` is not a section"):
        load_recipe(path, ["optim.lr.x=1"])
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])


def test_cross_field_rules(tmp_path: Path) -> None:
    recipe_dict = tiny_recipe(tmp_path)
    recipe_dict["model"] = {"init": "pretrained"}
    recipe_dict["data"]["domain_pattern"] = "no-group"
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe_dict))
    assert "name_or_path" in str(info.value)
    assert "data.domain_pattern" in str(info.value)


def test_duplicate_top_level_section_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(
        "model:\n  init: scratch\n"      # lines 1-2
        "run:\n  dir: first\n"            # lines 3-4
        "data:\n  shards: [a.jsonl]\n"    # lines 5-6
        "run:\n  dir: second\n",          # lines 7-8: would silently win with yaml.safe_load
        encoding="utf-8",
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value) == f"{path}:7: duplicate key 'run' (first at line 3)"
    assert info.value.exit_code == EXIT_USAGE


def test_duplicate_nested_key_and_keys_equal_after_parsing(tmp_path: Path) -> None:
    nested = tmp_path / "nested.yaml"
    nested.write_text("optim:\n  lr: 1.0e-3\n  warmup_steps: 2\n  lr: 3.0e-4\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"nested\.yaml:4: duplicate key 'lr' \(first at line 2\)"):
        load_recipe(nested)
    numeric = tmp_path / "numeric.yaml"
    numeric.write_text("eval:\n  sets:\n    x: a\nmap:\n  1: a\n  0x1: b\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"numeric\.yaml:6: duplicate key 1 \(first at line 5\)"):
        load_recipe(numeric)


def test_merge_keys_may_be_overridden_and_safe_load_semantics_are_kept() -> None:
    import yaml

    from olm_cli.recipe import RecipeLoader

    text = (
        "defaults: &base\n  lr: 0.5\n  warmup_steps: 7\n"
        "optim:\n  <<: *base\n  lr: 0.001\n"   # overriding a merged key is what merging is for
        "when: 2024-01-01\nflags: [yes, no, on]\nratio: 3e-4\n"
    )
    loaded = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    assert loaded["optim"] == {"lr": 0.001, "warmup_steps": 7}
    assert loaded == yaml.safe_load(text)  # dates, YAML 1.1 booleans, strings: all as before


def test_release_gate_and_release_sections(tmp_path: Path) -> None:
    recipe_dict = tiny_recipe(
        tmp_path,
        eval={"sets": {"code": "code.jsonl", "prose": "prose.jsonl"},
              "gate": {"max_regression": {"*": 0.05, "code": 0.02}, "relative": False}},
        release={"dtype": "bfloat16", "keep": 5},
    )
    recipe = load_recipe(write_recipe(tmp_path, recipe_dict))
    assert recipe.eval.gate.max_regression == {"*": 0.05, "code": 0.02} and recipe.eval.gate.relative is False
    assert (recipe.release.dtype, recipe.release.keep, recipe.release.enabled) == ("bfloat16", 5, True)
    default = load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path)))
    assert default.eval.gate.max_regression == {} and default.release.dtype == "auto"
    overridden = load_recipe(write_recipe(tmp_path, recipe_dict), ["eval.gate.max_regression.prose=0.1"])
    assert overridden.eval.gate.max_regression["prose"] == 0.1


@pytest.mark.parametrize(("eval_section", "release", "message"), [
    ({"sets": {"code": "c.jsonl"}, "gate": {"max_regression": {"cod": 0.1}}}, {},
     "eval: eval.gate.max_regression names domain(s) cod that are not in eval.sets; did you mean `code`?"),
    ({"sets": {"code": "c.jsonl"}, "gate": {"max_regression": {"prose": 0.1}}}, {},
     "names domain(s) prose that are not in eval.sets; eval.sets has code (`*` means every domain)"),
    ({"sets": {"code": "c.jsonl"}, "gate": {"max_regression": {"*": -0.1, "code": float("nan")}}}, {},
     "eval.gate.max_regression: budgets must be zero or more (an allowed loss increase), got *: -0.1, code: nan"),
    ({"gate": {"max_regression": {"*": 0.1}}}, {},
     "eval: eval.gate.max_regression needs eval.sets: without eval sets there is no loss to compare"),
    ({"sets": {"code": "c.jsonl"}, "after_increment": False, "gate": {"max_regression": {"*": 0.1}}}, {},
     "eval.gate.max_regression needs eval.after_increment: true"),
    ({"gate": {"relativ": True}}, {}, "eval.gate.relativ: unknown key; did you mean `relative`?"),
    ({}, {"dtype": "int8"}, "release.dtype: Input should be 'auto', 'float32', 'bfloat16' or 'float16'"),
    ({}, {"keep": 0}, "release.keep: Input should be greater than 0"),
])
def test_release_gate_validation(tmp_path: Path, eval_section: dict, release: dict, message: str) -> None:
    recipe_dict = tiny_recipe(tmp_path, eval=eval_section, release=release)
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(recipe_dict, "r.yaml")
    assert message in str(info.value)
    assert info.value.exit_code == EXIT_USAGE
