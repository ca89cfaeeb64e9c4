"""Reservoir: the buffer is a uniform random sample of every sample ever offered.

Algorithm R (Vitter 1985) with one uniform draw per offered sample: the n-th sample gets
``j = floor(u * n)``; it is admitted when ``j`` falls inside the buffer and then replaces the
sample at live position ``j``. With ``capacity_unit: samples`` this is exact: each of the n
samples seen is in the buffer with probability capacity / n. With ``tokens`` the current sample
count stands in for the capacity and extra room is made by uniform evictions, which is uniform
up to the variation of sample lengths (blocks are equal-length except at shard ends).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from olm_cli.replay.protocol import Incoming

if TYPE_CHECKING:
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.replay.table import SampleTable


class ReservoirPolicy:
    """Uniform over everything seen; draws uniformly."""

    name: ClassVar[str] = "reservoir"

    def attach(self, table: SampleTable, rng: np.random.Generator, cfg: ReplayConfig) -> None:
        self.table = table
        self.rng = rng
        self._pending = -1

    def admit(self, incoming: Incoming, room: bool) -> bool:
        self._pending = -1
        if room:
            return True
        j = int(incoming.u * self.table.seen)
        if j < self.table.size:
            self._pending = int(self.table.live[j])
            return True
        return False

    def victim(self, incoming: Incoming) -> int:
        if self._pending >= 0:
            slot, self._pending = self._pending, -1
            return slot
        if self.table.size == 0:
            return -1
        return int(self.table.live[self.rng.integers(0, self.table.size)])

    def on_insert(self, slot: int) -> None:
        pass

    def on_remove(self, slot: int) -> None:
        pass

    def on_replay(self, slots: np.ndarray) -> None:
        pass

    def on_rescore(self, slot: int) -> None:
        pass

    def on_grow(self, slot_capacity: int) -> None:
        pass

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.table.draw_uniform(self.rng, k), np.ones(k)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._pending = -1
