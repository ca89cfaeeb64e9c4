"""EWC and L2: zero at the anchor, quadratic away from it, Fisher accumulation, persistence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_llama

from olm_cli.regularize import (
    REGULARIZERS,
    EwcRegularizer,
    L2Regularizer,
    NoRegularizer,
    RegularizeConfig,
    Regularizer,
    estimate_fisher,
)
from olm_cli.regularize.anchor import legacy_state
from olm_cli.samples import collate
from olm_cli.state_files import load_tree, save_tree


def build_regularizer(cfg: RegularizeConfig) -> Regularizer:
    return REGULARIZERS.build(cfg)


def ewc(**settings: float) -> EwcRegularizer:
    return EwcRegularizer(RegularizeConfig(method="ewc", **settings))


def data_of(items: list[dict[str, torch.Tensor]]):
    """What the engine hands end_increment: ``data(n)`` gives up to n batches."""
    return lambda n: items[:n]


def round_trip(reg: Regularizer, fresh: Regularizer, tmp_path: Path) -> None:
    """Persist as the engine does (the checkpoint's strategy-state tree) and load into ``fresh``."""
    save_tree(tmp_path / "parts", {"regularizer": reg.state_dict()})
    fresh.load_state_dict(load_tree(tmp_path / "parts")["regularizer"])


def batches(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        collate([rng.integers(0, 64, size=s).astype(np.int32) for s in (8, 6)], pad_id=0)
        for _ in range(n)
    ]


def nudge(model: torch.nn.Module, direction: dict[str, torch.Tensor], scale: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(direction[name], alpha=scale)


def random_direction(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def test_builders() -> None:
    none = build_regularizer(RegularizeConfig())
    assert isinstance(none, NoRegularizer) and isinstance(none, Regularizer)
    assert none.penalty(tiny_llama()) is None and none.state_dict() == {}
    assert isinstance(build_regularizer(RegularizeConfig(method="ewc")), EwcRegularizer)
    assert isinstance(build_regularizer(RegularizeConfig(method="ewc")), Regularizer)
    assert isinstance(build_regularizer(RegularizeConfig(method="l2")), L2Regularizer)
    with pytest.raises(ValueError):
        RegularizeConfig(method="ewc", fisher_decay=1.5)


def test_ewc_zero_before_fisher_and_at_anchor_then_quadratic() -> None:
    model = tiny_llama()
    reg = build_regularizer(RegularizeConfig(method="ewc", strength=10.0, fisher_batches=3))
    assert isinstance(reg, EwcRegularizer)
    reg.begin_increment(model)
    direction = random_direction(model)
    nudge(model, direction, 0.01)
    assert reg.penalty(model) is None  # no Fisher yet
    nudge(model, direction, -0.01)

    reg.end_increment(model, data_of(batches(5)))
    assert reg.estimates == 1
    assert set(reg.fisher) == {n for n, _ in model.named_parameters()}
    assert all(bool((f >= 0).all()) for f in reg.fisher.values())
    assert all(p.grad is None for p in model.parameters())  # optimiser grads untouched

    reg.begin_increment(model)
    assert reg.penalty(model).item() == pytest.approx(0.0, abs=1e-12)
    nudge(model, direction, 0.01)
    p1 = reg.penalty(model)
    expected = (
        0.5
        * 10.0
        * sum(float((reg.fisher[n] * (0.01 * direction[n]) ** 2).sum()) for n in reg.fisher)
    )
    assert p1.item() == pytest.approx(expected, rel=1e-3)
    assert p1.item() > 0
    nudge(model, direction, 0.01)  # now 2x away
    assert reg.penalty(model).item() == pytest.approx(4 * p1.item(), rel=1e-3)
    reg.penalty(model).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ewc_fisher_is_mean_squared_gradient_and_decays() -> None:
    model = tiny_llama()
    data = batches(4)
    f1 = estimate_fisher(model, data[:2])
    f2 = estimate_fisher(model, data[2:])
    # Hand estimate for one parameter: mean over batches of the squared gradient.
    name = "model.layers.0.self_attn.q_proj.weight"
    grads = []
    for b in data[:2]:
        model.zero_grad()
        out = model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]
        )
        out.loss.backward()
        grads.append(dict(model.named_parameters())[name].grad.clone() ** 2)
    model.zero_grad()
    torch.testing.assert_close(f1[name], (grads[0] + grads[1]) / 2, rtol=1e-4, atol=1e-10)

    reg = ewc(strength=1.0, fisher_batches=2, fisher_decay=0.5)
    reg.end_increment(model, data_of(data[:2]))
    reg.end_increment(model, data_of(data[2:]))
    for n in f1:
        torch.testing.assert_close(reg.fisher[n], 0.5 * f1[n] + f2[n], rtol=1e-5, atol=1e-12)


def test_ewc_persisted_and_reloaded_identically(tmp_path: Path) -> None:
    model = tiny_llama()
    reg = ewc(strength=3.0, fisher_batches=2, fisher_decay=1.0)
    reg.begin_increment(model)
    reg.end_increment(model, data_of(batches(2)))
    fresh = ewc(strength=3.0, fisher_batches=2, fisher_decay=1.0)
    round_trip(reg, fresh, tmp_path)
    assert (tmp_path / "parts.safetensors").is_file()
    assert fresh.estimates == 1
    assert set(fresh.fisher) == set(reg.fisher)
    for n in reg.fisher:
        assert torch.equal(fresh.fisher[n], reg.fisher[n])
        assert torch.equal(fresh.anchor[n], reg.anchor[n])
    nudge(model, random_direction(model), 0.02)
    assert fresh.penalty(model).item() == pytest.approx(reg.penalty(model).item(), rel=1e-6)


def test_l2_exact_penalty_and_persistence(tmp_path: Path) -> None:
    model = tiny_llama()
    reg = build_regularizer(RegularizeConfig(method="l2", strength=2.0))
    assert isinstance(reg, L2Regularizer)
    assert reg.penalty(model) is None  # no anchor yet
    reg.begin_increment(model)
    assert reg.penalty(model).item() == 0.0
    direction = random_direction(model)
    nudge(model, direction, 0.01)
    expected = 0.5 * 2.0 * sum(float(((0.01 * d) ** 2).sum()) for d in direction.values())
    p1 = reg.penalty(model).item()
    assert p1 == pytest.approx(expected, rel=1e-3)
    nudge(model, direction, 0.01)
    assert reg.penalty(model).item() == pytest.approx(4 * p1, rel=1e-3)

    fresh = L2Regularizer(RegularizeConfig(method="l2", strength=2.0))
    round_trip(reg, fresh, tmp_path)
    for n, a in reg.anchor.items():
        assert torch.equal(fresh.anchor[n], a)
    assert fresh.penalty(model).item() == pytest.approx(reg.penalty(model).item(), rel=1e-6)


def test_anchor_covers_trainable_parameters_only() -> None:
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("lm_head"))
    reg = L2Regularizer(RegularizeConfig(method="l2", strength=1.0))
    reg.begin_increment(model)
    assert list(reg.anchor) == ["lm_head.weight"]


def test_state_of_an_olm_0_1_checkpoint_still_loads(tmp_path: Path) -> None:
    """0.1 kept the regulariser in ``regularizer/`` files; a resume from such a checkpoint keeps it."""
    from safetensors.torch import save_file

    model = tiny_llama()
    reg = ewc(strength=3.0, fisher_batches=2)
    reg.begin_increment(model)
    reg.end_increment(model, data_of(batches(2)))
    old = tmp_path / "regularizer"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in reg.fisher.items()}, str(old / "ewc_fisher.safetensors"))
    save_file({k: v.contiguous() for k, v in reg.anchor.items()}, str(old / "ewc_anchor.safetensors"))
    (old / "ewc.json").write_text('{"method": "ewc", "estimates": 1}')

    fresh = ewc(strength=3.0, fisher_batches=2)
    fresh.load_state_dict(legacy_state(old))
    assert fresh.estimates == 1
    nudge(model, random_direction(model), 0.02)
    assert fresh.penalty(model).item() == pytest.approx(reg.penalty(model).item(), rel=1e-6)
