"""Fast tests of scripts/bench_reptile.py: its three arms are valid recipes that differ only as stated."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from olm_cli.recipe import recipe_from_dict

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_reptile.py"


@pytest.fixture(scope="module")
def bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_reptile", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["FULL", "SMOKE"])
def test_reptile_arm_differs_from_plain_only_in_optim_meta(bench: Any, mode: str, tmp_path: Path) -> None:
    data = {"domains": [{"name": "code", "eval": "/e/code.jsonl"}, {"name": "prose", "eval": "/e/prose.jsonl"}]}
    settings = getattr(bench, mode)
    meta = {"method": "reptile", "inner_steps": 8, "outer_lr": 0.5}
    plain = bench.arm_recipe(tmp_path, data, settings, lr=2e-3, seed=0, meta={"method": "none"})
    reptile = bench.arm_recipe(tmp_path, data, settings, lr=2e-3, seed=0, meta=meta)
    assert recipe_from_dict(reptile).optim.meta.model_dump() == meta
    assert recipe_from_dict(plain).optim.meta.method == "none"
    assert {k: v for k, v in plain["optim"].items() if k != "meta"} == {k: v for k, v in reptile["optim"].items() if k != "meta"}
    assert {k: v for k, v in plain.items() if k != "optim"} == {k: v for k, v in reptile.items() if k != "optim"}
