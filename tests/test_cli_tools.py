"""`olm replay-inspect` and `olm merge` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import cli, latest, weights
from transformers import AutoModelForCausalLM


def _trained_run(tmp_path: Path) -> Path:
    add_shard(tmp_path / "stream", "alpha", 0)
    recipe = tiny_recipe(tmp_path, replay={"policy": "reservoir", "capacity": 40, "ratio": 0.25},
                         run={"max_steps": 6})
    path = write_recipe(tmp_path, recipe)
    assert cli("train", "--config", path).code == 0
    return tmp_path / "run"


def test_replay_inspect_json_show_and_export(tmp_path: Path) -> None:
    run = _trained_run(tmp_path)
    result = cli("replay-inspect", "--run", run, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["policy"] == "reservoir" and 0 < report["size"] <= 40
    assert [d["name"] for d in report["by_domain"]] == ["alpha"]

    export = tmp_path / "buffer.jsonl"
    shown = cli("replay-inspect", "--run", run, "--show", "2", "--export", export)
    assert shown.code == 0, shown.err
    assert "alpha" in shown.out
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    assert len(lines) == report["size"]
    assert all(row["domain"] == "alpha" and row["text"] for row in lines)  # decoded with the run's tokenizer


def test_replay_inspect_without_a_buffer_is_a_one_line_error(tmp_path: Path) -> None:
    result = cli("replay-inspect", "--run", tmp_path / "nothing-here")
    assert result.code == 1
    assert "error:" in result.err and len(result.err.strip().splitlines()) == 1


def test_merge_cli_weights_and_errors(tmp_path: Path) -> None:
    run = _trained_run(tmp_path)
    checkpoints = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    first, last = checkpoints[0], latest(run)
    assert first != last.resolve()
    out = tmp_path / "merged"
    result = cli("merge", first, last, "--weights", "3,1", "--out", out)
    assert result.code == 0, result.err
    merged = weights(out)
    a, b = weights(first), weights(last)
    for name, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.75 * a[name] + 0.25 * b[name])
    AutoModelForCausalLM.from_pretrained(out)  # loads with plain transformers

    bad = cli("merge", first, last, "--weights", "3,x", "--out", tmp_path / "m2")
    assert bad.code == 2 and "--weights" in bad.err


def test_usage_errors_exit_2_with_a_message_not_a_traceback() -> None:
    for args, expected in ((["train"], "Missing option '--config'"), (["trian"], "Did you mean 'train'"),
                           (["eval", "--bogus"], "No such option: --bogus")):
        result = cli(*args)
        assert result.code == 2, args
        assert expected in result.err and "Traceback" not in result.err
