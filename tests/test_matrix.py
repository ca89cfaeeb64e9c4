"""Continual-learning matrix: every measure on a hand-made matrix, JSON round trip, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console

from olm_cli.evaluation.matrix import ContinualMatrix

#        A     B     C
# row0  4.0   5.0   6.0   start
# row1  2.0   4.5   5.5   trained A
# row2  1.8   2.0   5.0   trained B
# row3  3.0   2.4   1.5   trained C
ROWS = [
    ("start", None, {"A": 4.0, "B": 5.0, "C": 6.0}),
    ("inc1", "A", {"A": 2.0, "B": 4.5, "C": 5.5}),
    ("inc2", "B", {"A": 1.8, "B": 2.0, "C": 5.0}),
    ("inc3", "C", {"A": 3.0, "B": 2.4, "C": 1.5}),
]
UNION = {"A": 1.5, "B": 1.9, "C": 1.4}


def matrix() -> ContinualMatrix:
    m = ContinualMatrix()
    for label, trained, losses in ROWS:
        m.add_row(label, trained, losses)
    return m


def test_every_measure_by_hand() -> None:
    s = matrix().summary(UNION)
    assert s["final_row"] == 3 and s["final_label"] == "inc3"
    assert s["average_final_loss"] == pytest.approx((3.0 + 2.4 + 1.5) / 3)
    # forgetting: final minus best since the domain was trained, before the final row.
    assert s["forgetting"] == pytest.approx({"A": 3.0 - 1.8, "B": 2.4 - 2.0})
    assert s["mean_forgetting"] == pytest.approx((1.2 + 0.4) / 2)
    # BWT: final minus right-after-training; C was trained last and is excluded.
    assert s["bwt_per_domain"] == pytest.approx({"A": 3.0 - 2.0, "B": 2.4 - 2.0})
    assert s["bwt"] == pytest.approx((1.0 + 0.4) / 2)
    # FWT: before training on j vs the start; A (trained first) has no "before".
    assert s["fwt_per_domain"] == pytest.approx({"B": 4.5 - 5.0, "C": 5.0 - 6.0})
    assert s["fwt"] == pytest.approx(-0.75)
    # Intransigence: right after training on j vs the joint-training reference.
    assert s["intransigence"] == pytest.approx({"A": 0.5, "B": 0.1, "C": 0.1})
    assert s["mean_intransigence"] == pytest.approx(0.7 / 3)
    assert matrix().summary()["intransigence"] == {}


def test_retrained_domain_uses_last_training_for_bwt_and_first_for_fwt() -> None:
    m = ContinualMatrix()
    m.add_row("start", None, {"A": 4.0, "B": 4.0})
    m.add_row("1", "B", {"A": 3.5, "B": 2.0})
    m.add_row("2", "A", {"A": 2.0, "B": 2.5})
    m.add_row("3", "A", {"A": 1.0, "B": 2.6})
    m.add_row("4", "B", {"A": 1.5, "B": 1.9})
    s = m.summary()
    assert s["bwt_per_domain"] == pytest.approx({"A": 1.5 - 1.0})
    assert s["forgetting"] == pytest.approx({"A": 1.5 - 1.0})
    assert s["fwt_per_domain"] == pytest.approx({"A": 3.5 - 4.0})  # B first trained in row 1


def test_late_domain_pads_earlier_rows_with_none() -> None:
    m = ContinualMatrix()
    m.add_row("start", None, {"A": 3.0})
    m.add_row("1", "A", {"A": 2.0})
    m.add_row("2", "B", {"A": 2.5, "B": 1.0})
    assert m.domains == ["A", "B"]
    assert m.rows == [[3.0, None], [2.0, None], [2.5, 1.0]]
    s = m.summary()
    assert s["fwt_per_domain"] == {}  # no start value for B
    assert s["bwt_per_domain"] == pytest.approx({"A": 0.5})


def test_empty_and_start_only() -> None:
    assert ContinualMatrix().summary()["average_final_loss"] is None
    m = ContinualMatrix()
    m.add_row("start", None, {"A": 3.0})
    s = m.summary()
    assert s["average_final_loss"] == 3.0 and s["bwt"] is None and s["fwt"] is None


def test_json_round_trip(tmp_path: Path) -> None:
    m = matrix()
    path = tmp_path / "sub" / "matrix.json"
    m.save(path, union=UNION)
    assert [p.name for p in path.parent.iterdir()] == ["matrix.json"]  # no temp left behind
    payload = json.loads(path.read_text())
    assert payload["summary"]["bwt"] == pytest.approx(0.7)
    assert payload["union"] == UNION
    back = ContinualMatrix.from_json(path)
    assert back == m
    assert back.summary(UNION) == m.summary(UNION)


def test_from_dict_rejects_ragged_rows() -> None:
    with pytest.raises(ValueError):
        ContinualMatrix.from_dict(
            {
                "domains": ["A"],
                "rows": [[1.0, 2.0]],
                "row_labels": ["s"],
                "trained_domain_per_row": [None],
            }
        )


def test_render_shows_matrix_and_measures() -> None:
    console = Console(record=True, width=160)
    matrix().render(console, union=UNION)
    text = console.export_text()
    assert "1.8000" in text and "inc3" in text
    assert "+1.2000" in text  # forgetting on A
    assert "-0.7500" in text  # mean FWT
    assert "2.3000" in text  # average final loss
