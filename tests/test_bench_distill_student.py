"""Fast tests of scripts/bench_distill_student.py's pure parts: its recipes are valid and fair.

The benchmark trains a teacher and two students (minutes on a CPU); the arms it compares are
checked here: same data, seed and steps, only the distillation differs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from olm_cli.recipe import recipe_from_dict

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_distill_student.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_distill_student", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


DATA = {"root": "/data", "domains": [{"name": "code", "eval": "eval/code.jsonl"}, {"name": "prose", "eval": "eval/prose.jsonl"}]}


@pytest.mark.parametrize("mode", ["FULL", "SMOKE"])
def test_arms_differ_only_in_the_teacher_term(bench: Any, mode: str, tmp_path: Path) -> None:
    settings = getattr(bench, mode)
    common = {"arch": settings["student_arch"], "steps": settings["student_steps"], "lr": 3e-3, "seed": 0,
              "tokenizer": "/teacher"}
    plain = bench.recipe(tmp_path, "student", DATA, settings, **common)
    taught = bench.recipe(tmp_path, "student+teacher", DATA, settings, **common,
                          distill={"method": "teacher", "teacher": "/teacher", "alpha": 0.5, "temperature": 2.0})
    teacher = bench.recipe(tmp_path, "teacher", DATA, settings, arch=settings["teacher_arch"],
                           steps=settings["teacher_steps"], lr=2e-3, seed=0)
    for config in (plain, taught, teacher):
        recipe_from_dict(config)  # every arm is a valid recipe
    assert plain["distill"] == {"method": "none"} and taught["distill"]["method"] == "teacher"
    for section in ("model", "data", "batch", "optim", "eval"):
        assert plain[section] == taught[section], section
    assert plain["run"] | {"dir": ""} == taught["run"] | {"dir": ""}
    small = recipe_from_dict(plain).model.arch.resolved()
    big = recipe_from_dict(teacher).model.arch.resolved()
    assert small["hidden_size"] < big["hidden_size"] and small["num_hidden_layers"] < big["num_hidden_layers"]


def test_render_reports_the_gain(bench: Any) -> None:
    arm = {"losses": {"code": 5.0}, "mean_loss": 5.0, "steps": 10, "seconds": 1.0, "parameters": 100}
    result = {"teacher": arm | {"mean_loss": 4.0}, "teacher_gain": 0.25,
              "arms": {"student": arm, "student+teacher": arm | {"mean_loss": 4.75}}}
    text = bench.render(result)
    assert "| student+teacher | 100 | 10 | 5.000 | 4.750 | 1.0 |" in text
    assert "+0.250" in text
