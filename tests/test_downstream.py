"""olm eval --tasks: lm-evaluation-harness on a release, offline, with a multiple-choice task defined here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import cli

from olm_cli.evaluation.downstream import normalise_results, parse_tasks
from olm_cli.trackers import downstream_tags

QUESTIONS = [
    ("the river runs past the old", ["mill", "sword", "lambda"], 0),
    ("def return import class self", ["flour", "value", "castle"], 1),
    ("king queen castle sword", ["yield", "water", "knight"], 2),
    ("the miller sings of bread", ["flour", "async", "herald"], 0),
    ("async await list dict", ["crown", "tuple", "stone"], 1),
    ("honour battle crown throne", ["wheat", "lambda", "banner"], 2),
]


def write_task(folder: Path) -> Path:
    """A local lm-eval multiple-choice task: a jsonl file and the task YAML that reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (folder / "tiny_mc.yaml").write_text(f"""task: olm_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


def test_task_names_and_results_are_normalised() -> None:
    assert parse_tasks(" arc_easy,hellaswag,,arc_easy ") == ["arc_easy", "hellaswag"]
    raw = {"mc": {"alias": "mc", "sample_len": 6, "acc,none": 0.5, "acc_stderr,none": "N/A",
                  "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.125}}
    results = normalise_results(raw)
    assert results == {"mc": {"acc": 0.5, "exact_match_strict-match": 0.25, "exact_match_stderr_strict-match": 0.125}}
    assert downstream_tags(results)["downstream/mc/acc"] == 0.5


def test_missing_extra_is_a_usage_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    result = cli("eval", "--checkpoint", tmp_path, "--tasks", "arc_easy")
    assert result.code == 2
    assert "pip install 'olm[lm-eval]'" in result.err and "Traceback" not in result.err


@pytest.fixture(scope="module")
def released_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one increment with a release, a TensorBoard tracker and `eval.report`."""
    root = tmp_path_factory.mktemp("downstream")
    add_shard(root / "stream", "alpha", 0)
    add_shard(root / "stream", "beta", 0)
    config = write_recipe(root, tiny_recipe(root, run={"trackers": ["tensorboard"]}, eval={"report": True}))
    assert cli("train", "--config", config).code == 0
    return root / "run"


@pytest.mark.slow
def test_unknown_task_is_a_usage_error_with_a_hint(released_run: Path, tmp_path: Path) -> None:
    result = cli("eval", "--run", released_run, "--tasks", "olm_tiny_mcq", "--task-dir", write_task(tmp_path))
    assert result.code == 2
    assert "unknown lm-eval task(s): olm_tiny_mcq (did you mean olm_tiny_mc?)" in result.err


def _expected_accuracy(model_dir: Path, limit: int) -> float:
    """The accuracy measured here, independently: the choice with the highest log-likelihood after the question."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    correct = 0
    for question, choices, answer in QUESTIONS[:limit]:
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        scores = []
        for choice in choices:
            whole = tokenizer(question + " " + choice, add_special_tokens=False)["input_ids"]
            assert whole[: len(context)] == context
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(float(logits[i - 1, whole[i]]) for i in range(len(context), len(whole))))
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return correct / limit


@pytest.mark.slow
def test_tasks_on_the_release_go_to_history_and_trackers(released_run: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = cli("eval", "--run", released_run, "--tasks", "olm_tiny_mc", "--task-dir", write_task(tmp_path),
                 "--limit", "5", "--json")
    assert result.code == 0, result.err
    out: dict[str, Any] = result.json()
    release = (released_run / "releases" / "latest").resolve()
    info = json.loads((release / "release.json").read_text())
    assert Path(out["model"]) == release and out["step"] == info["step"] and out["increment"] == 1
    acc = out["tasks"]["olm_tiny_mc"]["acc"]
    assert acc == pytest.approx(_expected_accuracy(release, 5))
    assert out["tasks"]["olm_tiny_mc"]["acc_stderr"] > 0

    row = [json.loads(line) for line in (released_run / "eval" / "history.jsonl").read_text().splitlines()][-1]
    assert row["downstream"] == out["tasks"] and row["step"] == info["step"] and row["increment"] == 1
    assert "5 examples per task" in row["settings"]

    report = json.loads((released_run / "report" / "report.json").read_text())  # eval.report: regenerated
    assert report["eval"]["extra_metrics"]["downstream/olm_tiny_mc/acc"][-1]["value"] == pytest.approx(acc)

    status = cli("status", "--run", released_run)
    assert f"downstream: olm_tiny_mc acc {acc:.4f}" in status.out, status.out

    events = EventAccumulator(str(released_run / "tensorboard"))
    events.Reload()
    points = events.Scalars("downstream/olm_tiny_mc/acc")
    assert [(p.step, p.value) for p in points] == [(info["step"], pytest.approx(acc))]
