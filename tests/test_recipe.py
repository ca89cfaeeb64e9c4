from __future__ import annotations

from pathlib import Path

import pytest
import yaml
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


# -- keys of strategies that are not selected (issue 10, item 5) --------------------------------


@pytest.mark.parametrize(
    ("section", "values", "line"),
    [
        ("selector", {"name": "random", "num_clusters": 3},
         "selector.num_clusters: applies to selector 'coverage', not 'random'"),
        ("selector", {"name": "random", "score_tokens": 16},
         "selector.score_tokens: applies to selectors 'entropy', 'loss', 'gradnorm', 'diversity', 'coverage', not 'random'"),
        ("batch", {"policy": "fixed", "window": 4},
         "batch.window: applies to batch policy 'adaptive', not 'fixed'"),
        ("batch", {"policy": "resource", "max_size": 32},
         "batch.max_size: applies to batch policies 'adaptive', 'uncertainty', 'periodic', not 'resource'"),
        ("replay", {"policy": "fifo", "priority_ageing": 0.01},
         "replay.priority_ageing: applies to replay policy 'priority', not 'fifo'"),
        ("replay", {"policy": "none", "ratio": 0.1},
         "replay.ratio: applies to replay policies 'reservoir', 'fifo', 'lru', 'priority', 'domain_balanced', "
         "'importance', not 'none'"),
        ("distill", {"method": "lwf", "teacher": "hub/teacher"},
         "distill.teacher: applies to distill method 'teacher', not 'lwf'"),
        ("distill", {"alpha": 0.3},  # method left at its default, none
         "distill.alpha: applies to distill methods 'teacher', 'lwf', 'stored_logits', not 'none'"),
        ("regularize", {"method": "l2", "fisher_decay": 0.5},
         "regularize.fisher_decay: applies to regularize method 'ewc', not 'l2'"),
        ("regularize", {"method": "none", "strength": 2.0},
         "regularize.strength: applies to regularize methods 'ewc', 'l2', not 'none'"),
    ],
)
def test_a_key_of_another_strategy_is_refused_naming_its_strategy(
    tmp_path: Path, section: str, values: dict, line: str
) -> None:
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, tiny_recipe(tmp_path, **{section: values})))
    assert info.value.exit_code == EXIT_USAGE
    assert str(info.value).splitlines()[1:] == [f"  {line}"]


def test_inapplicable_keys_are_reported_with_every_other_problem(tmp_path: Path) -> None:
    recipe_dict = tiny_recipe(
        tmp_path,
        selector={"name": "random", "num_clusters": 3, "mode": "sample"},
        batch={"policy": "periodic", "entropy_low": 2.0},  # periodic also lacks its period
        replay={"policy": "fifo", "capacity": 0, "importance_smoothing": 0.5},
        optim={"lrr": 0.1},
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(write_recipe(tmp_path, recipe_dict))
    lines = str(info.value).splitlines()
    assert "7 problem(s)" in lines[0]
    assert sorted(lines[1:]) == sorted([
        "  selector.num_clusters: applies to selector 'coverage', not 'random'",
        "  selector.mode: applies to selectors 'entropy', 'loss', 'gradnorm', 'diversity', 'coverage', not 'random'",
        "  batch: batch.policy 'periodic' needs batch.period_seconds or batch.period_samples",
        "  batch.entropy_low: applies to batch policy 'uncertainty', not 'periodic'",
        "  replay.capacity: Input should be greater than 0",
        "  replay.importance_smoothing: applies to replay policy 'importance', not 'fifo'",
        "  optim.lrr: unknown key; did you mean `lr`?",
    ])


def test_keys_of_the_selected_strategy_are_accepted(tmp_path: Path) -> None:
    recipe = load_recipe(write_recipe(tmp_path, tiny_recipe(
        tmp_path,
        selector={"name": "coverage", "num_clusters": 3, "mode": "sample", "score_tokens": 8},
        batch={"policy": "adaptive", "size": 8, "max_size": 16, "window": 4},
        replay={"policy": "priority", "capacity": 64, "ratio": 0.25, "priority_ageing": 0.01},
        distill={"method": "stored_logits", "topk": 4, "alpha": 0.7},
        regularize={"method": "ewc", "strength": 5.0, "fisher_batches": 2},
    )))
    assert (recipe.selector.num_clusters, recipe.selector.mode, recipe.selector.score_tokens) == (3, "sample", 8)
    assert (recipe.batch.max_size, recipe.batch.window) == (16, 4)
    assert recipe.replay.priority_ageing == 0.01 and recipe.replay.store_logits_topk == 4
    assert (recipe.distill.topk, recipe.distill.alpha) == (4, 0.7)
    assert (recipe.regularize.strength, recipe.regularize.fisher_batches) == (5.0, 2)
    # Keys of unselected strategies keep their defaults for attribute access.
    assert recipe.batch.memory_headroom == 0.1 and recipe.replay.importance_smoothing == 0.1


def test_fixed_and_resource_batches_are_not_held_to_bounds_they_cannot_set(tmp_path: Path) -> None:
    for policy in ("fixed", "resource"):
        recipe = recipe_from_dict(tiny_recipe(tmp_path, batch={"policy": policy, "size": 128}))
        assert recipe.batch.size == 128 > recipe.batch.max_size
    with pytest.raises(RecipeError, match=r"batch\.size \(128\) must lie within"):
        recipe_from_dict(tiny_recipe(tmp_path, batch={"policy": "adaptive", "size": 128}))


def test_the_resolved_recipe_lists_only_applicable_keys_and_validates_again(tmp_path: Path) -> None:
    recipe = recipe_from_dict(tiny_recipe(tmp_path, selector={"name": "coverage", "num_clusters": 3},
                                          replay={"policy": "fifo", "capacity": 64}))
    resolved = yaml.safe_load(recipe.to_yaml())
    assert resolved["selector"]["num_clusters"] == 3 and "mode" in resolved["selector"]
    assert "priority_ageing" not in resolved["replay"] and resolved["replay"]["capacity"] == 64
    assert resolved["batch"] == {"policy": "fixed", "size": 4, "micro_batch": 4}
    assert resolved["distill"] == {"method": "none"} and resolved["regularize"] == {"method": "none"}
    assert recipe_from_dict(resolved).to_yaml() == recipe.to_yaml()


def test_a_run_directory_recipe_from_before_the_rule_still_loads_for_olm(tmp_path: Path) -> None:
    """Older olm wrote every key of every strategy into RUN/recipe.yaml; `olm eval --run` reads it."""
    from pydantic import BaseModel

    from olm_cli.recipe import Recipe

    recipe_dict = tiny_recipe(tmp_path)
    for name in ("selector", "batch", "replay", "distill", "regularize"):
        section = Recipe.model_fields[name].annotation
        assert section is not None
        defaults = {key: field.get_default(call_default_factory=True) for key, field in section.model_fields.items()}
        # A nested section (replay.generate) is written as the mapping it is in YAML.
        recipe_dict[name] = {key: value.model_dump() if isinstance(value, BaseModel) else value
                             for key, value in defaults.items()}
        recipe_dict[name].update(tiny_recipe(tmp_path).get(name, {}))
    path = write_recipe(tmp_path, recipe_dict)
    with pytest.raises(RecipeError, match="selector.num_clusters: applies to selector 'coverage'"):
        load_recipe(path)
    recipe = load_recipe(path, written_by_olm=True)
    assert recipe.selector.name == "random" and recipe.batch.size == 4
    assert "num_clusters" not in yaml.safe_load(recipe.to_yaml())["selector"]


def test_cli_override_of_an_inapplicable_key_exits_2_naming_the_strategy(tmp_path: Path) -> None:
    from e2e_helpers import cli

    path = write_recipe(tmp_path, tiny_recipe(tmp_path))
    result = cli("validate", "--config", path, "selector.num_clusters=3", "replay.ratio=0.1")
    assert result.code == EXIT_USAGE, result.text
    assert "selector.num_clusters: applies to selector 'coverage', not 'random'" in result.err
    assert "replay.ratio: applies to replay policies 'reservoir'" in result.err
    assert "Traceback" not in result.text
    fixed = cli("validate", "--config", path, "selector.name=coverage", "selector.num_clusters=3")
    assert fixed.code == 0, fixed.text
    assert yaml.safe_load(fixed.out)["selector"]["num_clusters"] == 3


def test_a_declaration_naming_an_unknown_strategy_is_refused() -> None:
    from typing import ClassVar, Literal

    from pydantic import Field

    from olm_cli.config_base import StrategySection, for_strategies

    with pytest.raises(TypeError, match=r"declares unknown kinds \['coverge'\]"):
        class Misdeclared(StrategySection):  # noqa: F841 - defining it is the test
            strategy_key: ClassVar[str] = "name"
            strategy_kind: ClassVar[tuple[str, str]] = ("kind", "kinds")
            name: Literal["random", "coverage"] = "random"
            num_clusters: int = Field(default=8, json_schema_extra=for_strategies("coverge"))
