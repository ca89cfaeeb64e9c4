"""Fast checks of scripts/bench_export.py and scripts/bench_merge.py: their recipes and settings are valid.

The benchmarks themselves train models (minutes on a CPU) and are not run here.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

import pytest

from olm_cli.export import FORMATS, SAFETENSORS_DTYPES, export_model
from olm_cli.export.llama_gguf import GGUF_TYPES
from olm_cli.export.pruning import PRUNE_SCOPES
from olm_cli.recipe import recipe_from_dict

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("smoke", [False, True])
def test_export_bench_recipe_and_variants_are_valid(tmp_path: Path, smoke: bool) -> None:
    bench = load("bench_export")
    settings = bench.SMOKE if smoke else bench.FULL
    recipe = recipe_from_dict(bench.recipe(tmp_path, tmp_path / "data", settings))
    assert set(recipe.eval.sets) == set(bench.DOMAINS)
    accepted = set(inspect.signature(export_model).parameters)
    for name, options in bench.VARIANTS.items():
        assert set(options) <= accepted, name
        assert options["fmt"] in FORMATS
        assert options.get("quantize", "f16") in GGUF_TYPES
        assert options.get("dtype", "auto") in SAFETENSORS_DTYPES
        assert options.get("prune_scope", "unstructured") in PRUNE_SCOPES
        assert 0 <= options.get("prune", 0.0) < 1


def test_merge_bench_parses_its_options() -> None:
    bench = load("bench_merge")
    assert bench.FULL["shards"] >= 3 and bench.SMOKE["shards"] >= 2  # base shard + each site's shards
    with pytest.raises(SystemExit):
        bench.main(["--no-such-option"])
