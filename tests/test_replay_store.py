"""Storage building blocks: segment log and the flat trees."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from olm_cli.replay.store import SegmentStore
from olm_cli.replay.trees import MinTree, SumTree


def test_segments_roll_over_seal_and_unlink_when_dead(tmp_path: Path) -> None:
    store = SegmentStore(tmp_path / "seg", segment_bytes=100)
    locations = [store.append(bytes([i]) * 40) for i in range(5)]
    assert [segment for segment, _ in locations] == [0, 0, 1, 1, 2]
    assert bytes(store.read(*locations[3], 40)) == bytes([3]) * 40
    store.release(0, 40)
    store.release(0, 40)
    assert not (tmp_path / "seg" / "seg-00000000.bin").exists()
    store.seal()
    exported = store.export(tmp_path / "snap")
    assert exported == {1: 80, 2: 40}
    assert os.stat(tmp_path / "snap" / "seg-00000001.bin").st_nlink == 2  # a link, not a copy
    store.append(b"x" * 10)  # writing goes to a new segment, never to an exported one
    assert (tmp_path / "snap" / "seg-00000002.bin").stat().st_size == 40


def test_stale_scratch_segments_are_wiped(tmp_path: Path) -> None:
    (tmp_path / "seg").mkdir()
    (tmp_path / "seg" / "seg-00000007.bin").write_bytes(b"old")
    SegmentStore(tmp_path / "seg")
    assert list((tmp_path / "seg").iterdir()) == []


def test_sum_tree_draws_in_proportion_and_rebuilds_identically() -> None:
    tree = SumTree(5)
    for slot, weight in enumerate([1.0, 0.0, 3.0, 0.5, 0.25]):
        tree.set(slot, weight)
    assert tree.total == 4.75
    assert [tree.find(m) for m in (0.0, 0.99, 1.0, 3.99, 4.0, 4.49, 4.5, 4.74)] == [
        0,
        0,
        2,
        2,
        3,
        3,
        4,
        4,
    ]
    assert tree.find(4.75) == 4  # rounding past the end never lands on an empty slot
    rebuilt = SumTree(5, tree.leaves(5))
    assert rebuilt.nodes == tree.nodes


def test_min_tree_argmin_and_grow() -> None:
    tree = MinTree(3)
    for slot, key in enumerate([2.0, -1.0, 5.0]):
        tree.set(slot, key)
    assert tree.argmin() == 1 and tree.minimum == -1.0
    tree.set(1, math.inf)
    assert tree.argmin() == 0
    grown = MinTree(9, tree.leaves(3))
    grown.set(8, -3.0)
    assert grown.argmin() == 8 and np.isinf(grown.leaves(9)[3:8]).all()
