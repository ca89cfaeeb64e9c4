"""Distillation: the KL arithmetic by hand, LwF snapshots, vocab checks, stored top-k logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from olm_cli.distill import (
    DISTILLERS,
    DistillConfig,
    Distiller,
    IncrementStart,
    LwfDistiller,
    NoDistiller,
    StoredLogitsDistiller,
    TeacherDistiller,
    capture_topk,
    collate_stored,
    kd_kl,
    topk_logits,
)
from olm_cli.errors import RecipeError
from olm_cli.samples import IGNORE_INDEX, collate, per_sample_loss
from olm_cli.strategy import StrategyContext

START = IncrementStart(increment=1, resuming=False, from_random_init=False)


def build_distiller(cfg: DistillConfig, load_teacher=None, run_dir=None) -> Distiller:
    """A distiller through the family's registry, with a context whose model loader is ``load_teacher``."""
    load = (lambda source, **_options: load_teacher(source)) if load_teacher is not None else None
    return DISTILLERS.build(cfg, StrategyContext(load_model=load, run_dir=run_dir))


def batch(seed: int = 1) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return collate([rng.integers(0, 64, size=n).astype(np.int32) for n in (7, 5)], pad_id=0)


def hand_kl(student: list[float], teacher: list[float], t: float) -> float:
    """KL(softmax(teacher/t) || softmax(student/t)) with explicit sums."""
    zs = sum(math.exp(x / t) for x in student)
    zt = sum(math.exp(x / t) for x in teacher)
    total = 0.0
    for s, q in zip(student, teacher, strict=True):
        p_t = math.exp(q / t) / zt
        p_s = math.exp(s / t) / zs
        total += p_t * (math.log(p_t) - math.log(p_s))
    return total


def test_kd_kl_matches_hand_computation_and_scales_with_t_squared() -> None:
    student = [[1.0, 0.0, -1.0, 0.5], [0.2, 0.3, 2.0, -0.4]]
    teacher = [[0.0, 1.5, -0.5, 0.5], [1.0, 0.3, 0.1, 0.0]]
    s = torch.tensor([student])
    t = torch.tensor([teacher])
    mask = torch.tensor([[True, True]])
    for temp in (1.0, 2.0, 4.0):
        expected = (
            temp**2
            * (hand_kl(student[0], teacher[0], temp) + hand_kl(student[1], teacher[1], temp))
            / 2
        )
        assert kd_kl(s, t, mask, temp).item() == pytest.approx(expected, rel=1e-5)
    # A masked position does not count.
    only_first = kd_kl(s, t, torch.tensor([[True, False]]), 2.0).item()
    assert only_first == pytest.approx(4.0 * hand_kl(student[0], teacher[0], 2.0), rel=1e-5)
    assert kd_kl(t, t, mask, 2.0).item() == pytest.approx(0.0, abs=1e-7)


def test_teacher_distiller_uses_shifted_positions_of_real_tokens() -> None:
    student, teacher = tiny_llama(0), tiny_llama(1)
    d = build_distiller(
        DistillConfig(method="teacher", teacher="t", temperature=2.0),
        load_teacher=lambda src: teacher,
    )
    assert isinstance(d, TeacherDistiller)
    d.begin_increment(student, START)
    assert not any(p.requires_grad for p in teacher.parameters())
    b = batch()
    s_logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    with torch.no_grad():
        t_logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    terms = []
    for row in range(2):
        for pos in range(b["labels"].shape[1] - 1):
            if b["labels"][row, pos + 1] != IGNORE_INDEX:
                terms.append(hand_kl(s_logits[row, pos].tolist(), t_logits[row, pos].tolist(), 2.0))
    assert len(terms) == 6 + 4
    loss = d.loss(s_logits, b)
    assert loss is not None
    assert loss.item() == pytest.approx(4.0 * sum(terms) / len(terms), rel=1e-4)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_loaded_lazily_once() -> None:
    calls: list[str] = []

    def load(src: str) -> torch.nn.Module:
        calls.append(src)
        return tiny_llama(3)

    d = build_distiller(DistillConfig(method="teacher", teacher="hub/teacher"), load_teacher=load)
    assert calls == []
    student = tiny_llama(0)
    d.begin_increment(student, START)
    d.begin_increment(student, START)
    assert calls == ["hub/teacher"]

    # A resumed increment may call loss() without begin_increment: load on first use.
    resumed = build_distiller(
        DistillConfig(method="teacher", teacher="hub/teacher"), load_teacher=load
    )
    b = batch()
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert resumed.loss(logits, b).item() > 0
    assert calls == ["hub/teacher", "hub/teacher"]
    mismatched = build_distiller(
        DistillConfig(method="teacher", teacher="big"),
        load_teacher=lambda s: tiny_llama(1, vocab=80),
    )
    with pytest.raises(RecipeError, match=r"80.*64"):
        mismatched.loss(logits, b)


def test_vocab_mismatch_names_both_sizes() -> None:
    d = build_distiller(
        DistillConfig(method="teacher", teacher="big"),
        load_teacher=lambda s: tiny_llama(1, vocab=80),
    )
    with pytest.raises(RecipeError, match=r"80.*64"):
        d.begin_increment(tiny_llama(0, vocab=64), START)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="teacher"):
        DistillConfig(method="teacher")
    with pytest.raises(ValueError):
        DistillConfig(method="lwf", alpha=1.5)
    with pytest.raises(ValueError):
        DistillConfig(method="lwf", temperature=0.0)
    with pytest.raises(ValueError, match="extra"):
        DistillConfig(temprature=2.0)  # type: ignore[call-arg]
    none = build_distiller(DistillConfig())
    assert isinstance(none, NoDistiller) and isinstance(none, Distiller)
    assert none.loss(torch.zeros(1, 2, 4), batch()) is None and none.state_dict() == {}


def test_lwf_teacher_is_frozen_snapshot_of_increment_start() -> None:
    student = tiny_llama(0)
    d = build_distiller(DistillConfig(method="lwf", alpha=0.5), load_teacher=lambda s: student)
    assert isinstance(d, LwfDistiller)
    d.begin_increment(student, START)
    teacher = d.teacher
    assert teacher is not None and teacher is not student
    before = {n: p.clone() for n, p in teacher.named_parameters()}
    b = batch()
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    kd = d.loss(logits, b)
    assert kd is not None and kd.item() == pytest.approx(0.0, abs=1e-6)

    optim = torch.optim.SGD(student.parameters(), lr=1.0)
    rows, counts = per_sample_loss(logits, b["labels"])
    ce = (rows * counts).sum() / counts.sum()
    (0.5 * ce + 0.5 * kd).backward()
    optim.step()

    for name, p in teacher.named_parameters():
        assert torch.equal(p, before[name]), name
        assert not p.requires_grad and p.grad is None
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert d.loss(logits, b).item() > 1e-4  # student moved, teacher did not

    d.begin_increment(student, START)  # next increment: teacher = the trained student
    assert d.loss(logits, b).item() == pytest.approx(0.0, abs=1e-6)
    assert d.state_dict()["snapshots"] == 2


def test_topk_logits_shapes_and_dtypes() -> None:
    logits = torch.randn(5, 64)
    values, indices = topk_logits(logits, 8)
    assert values.shape == (5, 8) and values.dtype == np.float16
    assert indices.shape == (5, 8) and indices.dtype == np.int32
    ref_v, ref_i = torch.topk(logits, 8)
    np.testing.assert_array_equal(indices, ref_i.numpy())
    np.testing.assert_allclose(values, ref_v.numpy(), atol=1e-2)
    assert topk_logits(logits, 100)[0].shape == (5, 64)  # k clipped to the vocabulary


def test_stored_logits_zero_on_match_positive_otherwise_and_row_mask() -> None:
    student = tiny_llama(0)
    d = build_distiller(
        DistillConfig(method="stored_logits", topk=8), load_teacher=lambda s: student
    )
    assert isinstance(d, StoredLogitsDistiller) and isinstance(d, Distiller)
    d.begin_increment(student, START)
    b = batch()
    with torch.no_grad():
        logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    entries = capture_topk(logits, b["attention_mask"].sum(dim=1).tolist(), 8)
    assert [e[0].shape for e in entries] == [(7, 8), (5, 8)]
    width = b["input_ids"].shape[1]

    stored = collate_stored(entries, width)
    # float16 storage rounds the values, so "zero" is up to that rounding.
    assert d.loss(logits, b, stored).item() == pytest.approx(0.0, abs=1e-4)
    # A constant shift of the student's logits changes nothing (softmax over the k ids).
    assert d.loss(logits + 3.0, b, stored).item() == pytest.approx(0.0, abs=1e-4)

    other = tiny_llama(5)
    with torch.no_grad():
        other_logits = other(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert d.loss(other_logits, b, stored).item() > 1e-3

    # Row 1 has garbage stored logits but its row_mask is False: it must not count.
    spread = np.broadcast_to(np.linspace(0.0, 8.0, 8, dtype=np.float16), entries[1][0].shape)
    garbage = (spread.copy(), entries[1][1])
    values, indices, row_mask = collate_stored([entries[0], garbage], width)
    row_mask[1] = False
    assert d.loss(logits, b, (values, indices, row_mask)).item() == pytest.approx(0.0, abs=1e-4)
    row_mask[1] = True
    assert d.loss(logits, b, (values, indices, row_mask)).item() > 1e-3

    assert d.loss(logits, b, collate_stored([None, None], width)) is None
    assert d.loss(logits, b, None) is None
    values, indices, row_mask = collate_stored([None, entries[1]], width)
    assert row_mask.tolist() == [False, True]


def test_lwf_keeps_its_start_model_and_distils_from_it_after_a_resume(tmp_path) -> None:
    from olm_cli.modeling import load_pretrained

    student = tiny_llama(0)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    d = build_distiller(DistillConfig(method="lwf"), load_teacher=lambda src: load_pretrained(src), run_dir=tmp_path)
    d.begin_increment(student, IncrementStart(increment=3, resuming=False, from_random_init=False))
    assert (tmp_path / "increment-start" / "model.safetensors").is_file()
    with torch.no_grad():  # training moves the student on
        for p in student.parameters():
            p.add_(0.1)

    resumed = build_distiller(DistillConfig(method="lwf"), load_teacher=lambda src: load_pretrained(src),
                              run_dir=tmp_path)
    resumed.begin_increment(student, IncrementStart(increment=3, resuming=True, from_random_init=False))
    assert resumed.teacher is not None
    for name, p in resumed.teacher.named_parameters():
        assert torch.equal(p, start[name]), name  # the start of the increment, not the resumed weights

    # A start model kept for another increment is not used: the resumed weights are the fallback.
    other = build_distiller(DistillConfig(method="lwf"), load_teacher=lambda src: load_pretrained(src),
                            run_dir=tmp_path)
    other.begin_increment(student, IncrementStart(increment=4, resuming=True, from_random_init=False))
    moved = dict(student.named_parameters())
    assert all(torch.equal(p, moved[n]) for n, p in other.teacher.named_parameters())


def test_lwf_is_off_while_the_model_is_a_random_initialisation(tmp_path) -> None:
    notes: list[str] = []
    d = DISTILLERS.build(DistillConfig(method="lwf"), StrategyContext(run_dir=tmp_path, say=notes.append))
    student = tiny_llama(0)
    d.begin_increment(student, IncrementStart(increment=1, resuming=False, from_random_init=True))
    b = batch()
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    assert d.loss(logits, b) is None
    assert len(notes) == 1 and "lwf is off in increment 1" in notes[0]
    assert not (tmp_path / "increment-start").exists()


def test_every_registered_method_builds_and_an_unknown_one_is_named() -> None:
    for name in DISTILLERS:
        cfg = DistillConfig(method=name, **({"teacher": "t"} if name == "teacher" else {}))
        part = build_distiller(cfg, load_teacher=lambda src: tiny_llama())
        assert isinstance(part, Distiller) and part.name == name
    with pytest.raises(ValueError, match=r"unknown distill method 'lfw'; did you mean 'lwf'"):
        DISTILLERS.check("lfw")
