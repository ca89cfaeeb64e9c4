"""Importance: a uniform reservoir, drawn in proportion to score, with unbiasing weights.

Why a reservoir underneath: the buffer itself must stay an unbiased sample of the stream so
that ``weight * loss`` estimates the plain mean replay loss. Draws follow
``q_i = (1 - s) * score_i / sum(score) + s / N`` (``s`` = ``importance_smoothing``) and return
``weight_i = 1 / (N * q_i)``; then ``E_q[weight * loss] = mean(loss)`` and ``E_q[weight] = 1``,
while ``weight <= 1 / s``. Scores are typically per-sample losses: pass them to ``add`` and
refresh them with ``update_scores`` after each replay. Negative scores count as 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from olm_cli.replay.protocol import Incoming
from olm_cli.replay.reservoir import ReservoirPolicy
from olm_cli.replay.trees import SumTree

if TYPE_CHECKING:
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.replay.table import SampleTable


class ImportancePolicy:
    """Reservoir admission and eviction (composed), score-proportional weighted draws."""

    name: ClassVar[str] = "importance"

    def attach(self, table: SampleTable, rng: np.random.Generator, cfg: ReplayConfig) -> None:
        self.table = table
        self.rng = rng
        self.smoothing = cfg.importance_smoothing
        self.admission = ReservoirPolicy()
        self.admission.attach(table, rng, cfg)
        self.scores = SumTree(table.slot_capacity)

    def admit(self, incoming: Incoming, room: bool) -> bool:
        return self.admission.admit(incoming, room)

    def victim(self, incoming: Incoming) -> int:
        return self.admission.victim(incoming)

    def _set(self, slot: int) -> None:
        self.scores.set(slot, max(float(self.table.score[slot]), 0.0))

    def on_insert(self, slot: int) -> None:
        self._set(slot)

    def on_remove(self, slot: int) -> None:
        self.scores.set(slot, 0.0)

    def on_replay(self, slots: np.ndarray) -> None:
        pass

    def on_rescore(self, slot: int) -> None:
        self._set(slot)

    def on_grow(self, slot_capacity: int) -> None:
        self.scores = SumTree(
            slot_capacity, self.scores.leaves(min(self.scores.size, slot_capacity))
        )

    def probabilities(self, slots: np.ndarray) -> np.ndarray:
        """Draw probability q of each slot (what the weights invert)."""
        n = self.table.size
        total = self.scores.total
        if total <= 0.0:
            return np.full(slots.shape, 1.0 / n)
        values = np.array([self.scores.get(int(s)) for s in slots.tolist()], dtype=np.float64)
        return (1.0 - self.smoothing) * values / total + self.smoothing / n

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = self.table.size
        total = self.scores.total
        # Fixed number of draws whatever the branch, so the RNG stream stays easy to reason about.
        coins = self.rng.random(k)
        uniform = self.table.live[self.rng.integers(0, n, size=k)]
        masses = self.rng.random(k) * total
        if total <= 0.0:
            return uniform.astype(np.int64), np.ones(k)
        slots = np.where(
            coins < self.smoothing,
            uniform,
            np.fromiter((self.scores.find(m) for m in masses.tolist()), np.int64, count=k),
        ).astype(np.int64)
        return slots, 1.0 / (n * self.probabilities(slots))

    def state_dict(self) -> dict[str, Any]:
        return {"scores": self.scores.leaves(self.table.hwm)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.admission.load_state_dict({})
        self.scores = SumTree(
            self.table.slot_capacity, np.asarray(state["scores"], dtype=np.float64)
        )
