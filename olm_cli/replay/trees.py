"""Flat binary trees over slots: a sum tree for weighted draws and a min tree for eviction.

Both are stored in ``array.array('d')`` because single-element updates from Python are about
three times faster there than on numpy scalars, and they are what every insert does. Every
internal node is recomputed from its two children (never updated by a delta), so a tree is a
pure function of its leaves: rebuilding it from saved leaves after a restart gives bit-identical
sums, which is what makes a resumed run draw exactly the same samples.
"""

from __future__ import annotations

import math
from array import array

import numpy as np


def _leaf_count(capacity: int) -> int:
    return 1 << max(0, (max(1, capacity) - 1).bit_length())


class _FlatTree:
    identity: float = 0.0

    def __init__(self, capacity: int, leaves: np.ndarray | None = None) -> None:
        self.size = _leaf_count(capacity)
        full = np.full(2 * self.size, self.identity, dtype=np.float64)
        if leaves is not None:
            full[self.size : self.size + leaves.size] = leaves
        level = self.size
        while level > 1:
            lo = level // 2
            full[lo:level] = self._combine(
                full[2 * lo : 2 * level : 2], full[2 * lo + 1 : 2 * level : 2]
            )
            level = lo
        self.nodes = array("d")
        self.nodes.frombytes(full.tobytes())

    @staticmethod
    def _combine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def leaves(self, count: int) -> np.ndarray:
        """Copy of the first ``count`` leaves (what a snapshot stores)."""
        full = np.frombuffer(self.nodes, dtype=np.float64)
        return full[self.size : self.size + count].copy()

    def get(self, slot: int) -> float:
        return self.nodes[self.size + slot]


class SumTree(_FlatTree):
    """Prefix-sum search over non-negative slot weights: O(log n) update and draw."""

    identity = 0.0

    @staticmethod
    def _combine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return left + right

    @property
    def total(self) -> float:
        return self.nodes[1]

    def set(self, slot: int, value: float) -> None:
        nodes = self.nodes
        i = self.size + slot
        nodes[i] = value
        i >>= 1
        while i:
            nodes[i] = nodes[2 * i] + nodes[2 * i + 1]
            i >>= 1

    def find(self, mass: float) -> int:
        """Slot whose cumulative weight interval contains ``mass`` (never a zero-weight slot)."""
        nodes = self.nodes
        i = 1
        while i < self.size:
            left = nodes[2 * i]
            if (mass < left or nodes[2 * i + 1] <= 0.0) and left > 0.0:
                i = 2 * i
            else:
                mass -= left
                i = 2 * i + 1
        return i - self.size


class MinTree(_FlatTree):
    """Minimum over slot keys (free slots hold +inf): O(log n) update and argmin."""

    identity = math.inf

    @staticmethod
    def _combine(left: np.ndarray, right: np.ndarray) -> np.ndarray:
        return np.minimum(left, right)

    @property
    def minimum(self) -> float:
        return self.nodes[1]

    def set(self, slot: int, value: float) -> None:
        nodes = self.nodes
        i = self.size + slot
        nodes[i] = value
        i >>= 1
        while i:
            left = nodes[2 * i]
            right = nodes[2 * i + 1]
            nodes[i] = left if left <= right else right
            i >>= 1

    def argmin(self) -> int:
        """Lowest-keyed slot; ties go to the lowest slot so the choice is deterministic."""
        nodes = self.nodes
        i = 1
        while i < self.size:
            i = 2 * i if nodes[2 * i] <= nodes[2 * i + 1] else 2 * i + 1
        return i - self.size
