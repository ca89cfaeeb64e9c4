"""Priority: keep and replay the samples with the highest (aged) score, e.g. their loss.

Effective priority is ``score * exp(-ageing * (now - scored_at))``. In log space that is
``key - ageing * now`` with the time-invariant ``key = log(score) + ageing * scored_at``, so
ageing never requires re-keying the buffer: eviction takes the minimum key (a min tree) and
draws are proportional to ``exp(key - ref)`` (a sum tree), where ``ref`` is re-based when keys
drift far enough to risk overflow. Scores must be positive; smaller ones count as 1e-12.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from olm_cli.replay.protocol import Incoming
from olm_cli.replay.trees import MinTree, SumTree

if TYPE_CHECKING:
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.replay.table import SampleTable

_MIN_SCORE = 1e-12
_REBASE_AT = 500.0  # exp(500) is far from float64 overflow, yet leaves 1e-217 of head room


class PriorityPolicy:
    """Highest aged score stays; draws proportional to aged score (weights stay 1)."""

    name: ClassVar[str] = "priority"

    def attach(self, table: SampleTable, rng: np.random.Generator, cfg: ReplayConfig) -> None:
        self.table = table
        self.rng = rng
        self.ageing = cfg.priority_ageing
        self.ref = 0.0
        self.keys = MinTree(table.slot_capacity)
        self.weights = SumTree(table.slot_capacity)

    def key(self, score: float, scored_at: int) -> float:
        return math.log(max(score, _MIN_SCORE)) + self.ageing * scored_at

    def admit(self, incoming: Incoming, room: bool) -> bool:
        if room:
            return True
        return self.key(incoming.score, incoming.step) > self.keys.minimum

    def victim(self, incoming: Incoming) -> int:
        if self.table.size == 0:
            return -1
        if self.key(incoming.score, incoming.step) <= self.keys.minimum:
            return -1  # everything left is worth more than the newcomer
        return self.keys.argmin()

    def _set(self, slot: int) -> None:
        key = self.key(float(self.table.score[slot]), int(self.table.scored_at[slot]))
        self.keys.set(slot, key)
        if key - self.ref > _REBASE_AT:
            self._rebase(key)
        self.weights.set(slot, math.exp(key - self.ref))

    def _rebase(self, ref: float) -> None:
        self.ref = ref
        count = self.table.slot_capacity
        keys = self.keys.leaves(count)
        with np.errstate(under="ignore"):
            weights = np.where(np.isfinite(keys), np.exp(keys - ref), 0.0)
        self.weights = SumTree(count, weights)

    def on_insert(self, slot: int) -> None:
        self._set(slot)

    def on_remove(self, slot: int) -> None:
        self.keys.set(slot, math.inf)
        self.weights.set(slot, 0.0)

    def on_replay(self, slots: np.ndarray) -> None:
        pass

    def on_rescore(self, slot: int) -> None:
        self._set(slot)

    def on_grow(self, slot_capacity: int) -> None:
        self.keys = MinTree(slot_capacity, self.keys.leaves(min(self.keys.size, slot_capacity)))
        self.weights = SumTree(
            slot_capacity, self.weights.leaves(min(self.weights.size, slot_capacity))
        )

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        total = self.weights.total
        if not (total > 0.0 and math.isfinite(total)):
            keys = self.keys.leaves(self.table.slot_capacity)
            self._rebase(float(keys[np.isfinite(keys)].max()))
            total = self.weights.total
        masses = self.rng.random(k) * total
        slots = np.fromiter((self.weights.find(m) for m in masses.tolist()), np.int64, count=k)
        return slots, np.ones(k)

    def state_dict(self) -> dict[str, Any]:
        count = self.table.hwm
        return {
            "ref": self.ref,
            "keys": self.keys.leaves(count),
            "weights": self.weights.leaves(count),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ref = float(state["ref"])
        capacity = self.table.slot_capacity
        self.keys = MinTree(capacity, np.asarray(state["keys"], dtype=np.float64))
        self.weights = SumTree(capacity, np.asarray(state["weights"], dtype=np.float64))
