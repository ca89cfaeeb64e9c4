"""The replay recipe section rejects bad values and unknown keys."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from olm_cli.replay import ReplayConfig


def test_defaults_disable_replay() -> None:
    cfg = ReplayConfig()
    assert cfg.policy == "none" and cfg.ratio == 0.0 and cfg.seed_from == []


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"policy": "reservoir", "capacity": -1}, "capacity"),
        ({"policy": "reservoir", "capacity": 0}, "capacity"),
        ({"policy": "reservoir", "ratio": 1.0}, "ratio"),
        ({"policy": "reservoir", "ratio": -0.1}, "ratio"),
        ({"policy": "random"}, "policy"),
        ({"policy": "reservoir", "capacity_unit": "bytes"}, "capacity_unit"),
        ({"policy": "reservoir", "store_logits_topk": -1}, "store_logits_topk"),
        ({"policy": "priority", "priority_ageing": -0.5}, "priority_ageing"),
        ({"policy": "importance", "importance_smoothing": 1.5}, "importance_smoothing"),
        ({"policy": "reservoir", "seed_samples": -3}, "seed_samples"),
        ({"capacityy": 10}, "capacityy"),
    ],
)
def test_invalid_values_name_the_field(values: dict, field: str) -> None:
    with pytest.raises(ValidationError) as info:
        ReplayConfig(**values)
    assert field in {str(error["loc"][0]) for error in info.value.errors()}


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ValidationError) as info:
        ReplayConfig(policy="reservoir", capacity=-1, ratio=2.0, unknown=True)
    assert {str(e["loc"][0]) for e in info.value.errors()} == {"capacity", "ratio", "unknown"}


def test_every_field_is_documented() -> None:
    for name, field in ReplayConfig.model_fields.items():
        assert field.description, name


def test_assignment_is_validated() -> None:
    cfg = ReplayConfig(policy="fifo", ratio=0.25)
    with pytest.raises(ValidationError):
        cfg.ratio = 1.0
