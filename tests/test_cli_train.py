"""``olm train``/``eval``/``validate``/``status`` end to end, through the real entry point.

One run directory is trained for two increments (``alpha`` shards first, then a ``beta`` shard
arrives) and the tests read what a user or a cron script would read from it: metrics, the
resolved recipe, a checkpoint any HF user can load, eval results, status and the matrix.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import make_documents, write_jsonl
from e2e_helpers import REPO, add_shard, cli, latest, make_recipe, olm, subprocess_env, weights
from safetensors.torch import load_file

NOTHING_TO_DO_BUDGET_S = 2.0


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two increments on two domains: alpha (2 shards), then beta (1 shard), eval.sets for both."""
    root = tmp_path_factory.mktemp("cli")
    held_out = {d: write_jsonl(root / "eval" / f"{d}.jsonl", make_documents(d, 4, seed=99)) for d in ("alpha", "beta")}
    recipe = make_recipe(root, shards=[("alpha", 0), ("alpha", 1)], docs=8,
                         eval={"sets": {d: str(p) for d, p in held_out.items()}})
    first = cli("train", "--config", recipe, "--json")
    assert first.code == 0, first.text
    add_shard(root / "stream", "beta", 0, docs=8)
    second = cli("train", "--config", recipe, "--json")
    assert second.code == 0, second.text
    return {"root": root, "recipe": recipe, "dir": root / "run", "held_out": held_out,
            "outcomes": [first.json(), second.json()]}


def test_train_reports_each_increment(run: dict[str, Any]) -> None:
    first, second = run["outcomes"]
    assert (first["status"], first["exit_code"], first["increment"]) == ("increment_complete", 0, 1)
    assert (second["status"], second["exit_code"], second["increment"]) == ("increment_complete", 0, 2)
    assert first["steps"] > 0 and first["tokens"] > 0
    assert Path(second["checkpoint"]) == latest(run["dir"])


def test_metrics_lines_have_the_documented_fields(run: dict[str, Any]) -> None:
    rows = [json.loads(line) for line in (run["dir"] / "metrics.jsonl").read_text().splitlines()]
    first, second = run["outcomes"]
    assert [r["step"] for r in rows] == list(range(1, first["steps"] + second["steps"] + 1))
    for row in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "domain"} <= row.keys()
        assert math.isfinite(row["loss"]) and row["loss"] > 0
        assert 0 < row["lr"] <= 1e-3
        assert row["tokens_per_s"] > 0
    assert all(b["tokens"] > a["tokens"] for a, b in zip(rows, rows[1:], strict=False))
    assert rows[-1]["tokens"] == first["tokens"] + second["tokens"]
    assert {r["domain"] for r in rows if r["increment"] == 1} == {"alpha"}
    assert {r["domain"] for r in rows if r["increment"] == 2} == {"beta"}


def test_run_directory_keeps_the_resolved_recipe(run: dict[str, Any]) -> None:
    saved = yaml.safe_load((run["dir"] / "recipe.yaml").read_text())
    # Defaults are filled in, so the run directory alone says how it was trained.
    assert saved["optim"]["schedule"] == "cosine"
    assert saved["selector"]["name"] == "random"
    assert saved["run"]["seed"] == 0 and saved["run"]["dir"] == str(run["dir"])
    assert saved["optim"]["lr"] == 1e-3 and saved["data"]["block_size"] == 32
    assert all(Path(p).is_absolute() for p in saved["data"]["shards"])
    # And it is itself a valid recipe that resolves to the same thing.
    again = cli("validate", "--config", run["dir"] / "recipe.yaml")
    assert again.code == 0, again.text
    assert yaml.safe_load(again.out) == saved


def test_latest_checkpoint_loads_with_plain_transformers(run: dict[str, Any]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = run["dir"] / "checkpoints" / "latest"
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = "the river runs past the old mill"
    ids = tokenizer(text, return_tensors="pt")
    assert tokenizer.decode(ids["input_ids"][0]) == text
    assert tokenizer.eos_token is not None and len(tokenizer) == model.config.vocab_size

    files = load_file(str(path / "model.safetensors"))
    assert model.state_dict().keys() == files.keys()
    from_files = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).eval()
    from_files.load_state_dict(files, strict=True)
    with torch.no_grad():
        logits = model(**ids).logits
        expected = from_files(**ids).logits
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, expected)


def test_eval_json_per_domain(run: dict[str, Any]) -> None:
    result = cli("eval", "--run", run["dir"], "--json")
    assert result.code == 0, result.text
    report = result.json()
    assert set(report["domains"]) == {"alpha", "beta"}
    for values in report["domains"].values():
        assert set(values) == {"loss", "perplexity", "tokens"}
        assert values["perplexity"] == pytest.approx(math.exp(values["loss"]))
        assert values["tokens"] > 0

    # --data replaces the recipe's eval.sets, also for a bare checkpoint directory.
    gamma = write_jsonl(run["root"] / "eval" / "gamma.jsonl", make_documents("gamma", 3, seed=5))
    for source in (["--run", run["dir"]], ["--checkpoint", latest(run["dir"])]):
        other = cli("eval", *source, "--data", f"gamma={gamma}", "--json")
        assert other.code == 0, other.text
        assert set(other.json()["domains"]) == {"gamma"}
    # Evaluation is deterministic: the same checkpoint gives the same numbers.
    assert cli("eval", "--run", run["dir"], "--json").json()["domains"] == report["domains"]

    bad = cli("eval", "--run", run["dir"], "--data", "gamma")
    assert bad.code == 2 and bad.has("expected NAME=VALUE"), bad.text


def test_eval_matrix_after_two_increments_on_two_domains(run: dict[str, Any]) -> None:
    result = cli("eval", "--run", run["dir"], "--matrix", "--json")
    assert result.code == 0, result.text
    matrix = result.json()
    assert matrix["domains"] == ["alpha", "beta"]
    labels = matrix["row_labels"]
    # An optional "start" row (the model before any training) comes first.
    assert labels in (["inc 1", "inc 2"], ["start", "inc 1", "inc 2"]), labels
    inc1, inc2 = labels.index("inc 1"), labels.index("inc 2")
    assert matrix["trained_domain_per_row"][inc1:] == ["alpha", "beta"]
    assert all(len(row) == 2 and all(v is not None for v in row) for row in matrix["rows"])
    forgetting = matrix["summary"]["forgetting"]
    # alpha was trained in "inc 1" and evaluated again after beta: forgetting = R[inc2][a] - R[inc1][a].
    assert forgetting["alpha"] == pytest.approx(matrix["rows"][inc2][0] - matrix["rows"][inc1][0])
    assert "beta" not in forgetting  # still the last domain trained
    assert matrix["summary"]["mean_forgetting"] == pytest.approx(forgetting["alpha"])
    # The "inc 2" row holds the same numbers `olm eval` reports for the latest checkpoint.
    now = cli("eval", "--run", run["dir"], "--json").json()["domains"]
    assert matrix["rows"][inc2] == pytest.approx([now["alpha"]["loss"], now["beta"]["loss"]], rel=1e-5)

    human = cli("eval", "--run", run["dir"], "--matrix")
    assert human.code == 0 and "forgetting" in human.out


def test_status_json(run: dict[str, Any]) -> None:
    result = cli("status", "--run", run["dir"], "--json")
    assert result.code == 0, result.text
    status = result.json()
    assert {"run_dir", "increments", "shards", "tokens_trained", "last_checkpoint", "last_eval",
            "last_metrics", "lock", "problems"} <= status.keys()
    assert status["increments"] == 2
    assert status["shards"]["done"] == 3 and status["shards"]["pending"] == 0
    first, second = run["outcomes"]
    assert status["tokens_trained"] == first["tokens"] + second["tokens"]
    assert Path(status["last_checkpoint"]["path"]) == latest(run["dir"])
    assert status["last_metrics"]["step"] == first["steps"] + second["steps"]
    assert status["last_eval"]["increment"] == 2
    assert status["lock"] is None and status["problems"] == []


@pytest.mark.slow
def test_second_train_with_no_new_shards_is_a_fast_no_op(run: dict[str, Any], record_property: Any) -> None:
    checkpoint = latest(run["dir"])
    before = weights(checkpoint)
    timings = []
    for _ in range(2):  # best of two: a cold page cache is not what cron sees every night
        started = time.perf_counter()
        result = olm("train", "--config", run["recipe"])
        timings.append(time.perf_counter() - started)
        assert result.code == 0, result.text
        assert "nothing to do" in result.out
    record_property("nothing_to_do_seconds", min(timings))
    sys.stderr.write(f"\n'olm train' with nothing to do: {min(timings):.2f} s wall (best of {timings})\n")
    assert latest(run["dir"]) == checkpoint
    assert all(torch.equal(before[k], v) for k, v in weights(checkpoint).items())

    # Deciding that there is nothing to do must not pay for importing torch or transformers.
    trace = subprocess.run([sys.executable, "-X", "importtime", "-m", "olm_cli", "train", "--config", str(run["recipe"])],
                           capture_output=True, text=True, env=subprocess_env(), cwd=REPO, timeout=60)
    assert trace.returncode == 0, trace.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in trace.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(imported & {"torch", "transformers", "accelerate", "datasets"})
    assert not heavy, f"the nothing-to-do path imports {heavy}"
    if min(timings) > NOTHING_TO_DO_BUDGET_S:
        warnings.warn(f"'olm train' with nothing to do took {min(timings):.2f} s (> {NOTHING_TO_DO_BUDGET_S} s) "
                      "on this machine", stacklevel=1)


def test_validate_prints_the_resolved_recipe(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[], eval={})
    result = cli("validate", "--config", recipe, "optim.lr=3e-4", "replay.policy=fifo")
    assert result.code == 0, result.text
    resolved = yaml.safe_load(result.out)
    assert resolved["optim"]["lr"] == 3e-4 and resolved["replay"]["policy"] == "fifo"
    assert resolved["optim"]["warmup_steps"] == 2  # from the file
    assert resolved["optim"]["schedule"] == "cosine" and resolved["run"]["keep_checkpoints"] == 3  # defaults
    as_json = cli("validate", "--config", recipe, "--json")
    assert as_json.code == 0 and as_json.json()["batch"]["size"] == 4


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lrr=1"], ["optim.lrr: unknown key; did you mean `lr`?"]),
        (["optim.lrr=1", "run.max_stepz=3"], ["2 problem(s)", "optim.lrr: unknown key; did you mean `lr`?",
                                              "run.max_stepz: unknown key; did you mean `max_steps`?"]),
        (["nosuch.key=1"], ["nosuch: unknown key"]),
        (["optim.lr=-1"], ["optim.lr:"]),
        (["optim.lr"], ["not KEY=VALUE"]),
    ],
    ids=["typo", "all-errors-at-once", "unknown-section", "bad-value", "no-equals"],
)
def test_bad_recipe_or_override_exits_2(tmp_path: Path, overrides: list[str], expected: list[str]) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=4)
    for command in ("validate", "train"):
        result = cli(command, "--config", recipe, *overrides)
        assert result.code == 2, (command, result.text)
        for needle in expected:
            assert result.has(needle), (command, needle, result.text)
        assert "Traceback" not in result.text
    assert not (tmp_path / "run").exists(), "a rejected recipe must not touch the run directory"


def test_unknown_key_in_the_file_is_named_with_its_yaml_path(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=4)
    text = recipe.read_text()
    recipe.write_text(re.sub(r"^run:\n", "run:\n  chekpoint_every: 3\n", text, flags=re.M))
    result = cli("validate", "--config", recipe)
    assert result.code == 2
    assert result.has("run.chekpoint_every: unknown key; did you mean `checkpoint_every`?"), result.text
