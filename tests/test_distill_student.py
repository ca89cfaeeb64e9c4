"""Distillation into a smaller student (configs/distill-student.yaml): a bigger teacher checkpoint,
a smaller ``init: scratch`` student sharing its tokenizer, ``distill.method: teacher``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import add_shard, tiny_recipe, write_recipe
from e2e_helpers import cli, latest, weights

from olm_cli.distill import teacher as teacher_module
from olm_cli.modeling import load_pretrained, load_tokenizer
from olm_cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_student_recipe_distils_from_a_bigger_model_with_its_tokenizer() -> None:
    student = load_recipe(ROOT / "configs" / "distill-student.yaml")
    teacher = load_recipe(ROOT / "configs" / "quickstart.yaml")
    assert student.model.init == "scratch" and student.distill.method == "teacher"
    assert student.model.tokenizer == student.distill.teacher  # one vocabulary for both
    # Relative to the recipe file (resolved once the teacher exists): the quickstart run's release.
    source = os.path.normpath(ROOT / "configs" / (student.distill.teacher or ""))
    assert source == os.path.join(teacher.run.dir, "releases", "latest")
    small, big = student.model.arch.resolved(), teacher.model.arch.resolved()
    assert small["hidden_size"] < big["hidden_size"] and small["num_hidden_layers"] < big["num_hidden_layers"]


TEACHER_ARCH = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
STUDENT_ARCH = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}


def _student(tmp_path: Path, root: Path, teacher: Path, distill: dict[str, Any]) -> Path:
    """A student recipe on ``tmp_path``'s shards, its run in ``root/student``."""
    recipe = tiny_recipe(tmp_path, run={"dir": str(root / "student"), "max_steps": 8, "checkpoint_every": 50,
                                        "progress": False})
    recipe["model"]["tokenizer"] = str(teacher)
    recipe["model"]["arch"].update(STUDENT_ARCH)
    recipe["distill"] = distill
    return write_recipe(tmp_path, recipe, name=f"{root.name}.yaml")


@pytest.mark.slow
def test_student_trains_with_the_teacher_term_active(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for index in range(2):
        add_shard(tmp_path / "stream", "alpha", index, docs=16)
    teacher_recipe = tiny_recipe(tmp_path, run={"dir": str(tmp_path / "teacher"), "progress": False})
    teacher_recipe["model"]["arch"].update(TEACHER_ARCH)
    assert cli("train", "--config", write_recipe(tmp_path, teacher_recipe, name="teacher.yaml")).code == 0
    release = tmp_path / "teacher" / "releases" / "latest"

    # Every step's distillation term is computed against the teacher, and is a real (positive) KL.
    terms: list[float] = []
    real = teacher_module.distil_from

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        value = real(*args, **kwargs)
        terms.append(float(value.detach()))
        return value

    monkeypatch.setattr(teacher_module, "distil_from", recording)
    taught_root = tmp_path / "taught"
    taught = _student(tmp_path, taught_root, release, {"method": "teacher", "teacher": str(release), "alpha": 0.5})
    result = cli("train", "--config", taught, "--json")
    assert result.code == 0, result.text
    assert result.json()["steps"] == 8
    assert len(terms) == 8 and all(term > 0 for term in terms)

    # The student is smaller and shares the teacher's vocabulary.
    student_dir = latest(taught_root / "student")
    student, teacher = load_pretrained(str(student_dir)), load_pretrained(str(release))
    assert student.config.vocab_size == teacher.config.vocab_size
    assert load_tokenizer(str(student_dir)).get_vocab() == load_tokenizer(str(release)).get_vocab()
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in teacher.parameters()) / 3

    # Same seed, same data, no teacher: the weights differ only through the teacher term.
    plain_root = tmp_path / "plain"
    assert cli("train", "--config", _student(tmp_path, plain_root, release, {"method": "none"})).code == 0
    plain = weights(latest(plain_root / "student"))
    with_teacher = weights(student_dir)
    assert any(not torch.equal(plain[name], with_teacher[name]) for name in plain)
