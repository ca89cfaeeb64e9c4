"""FIFO: keep the most recent samples; the oldest insertion is evicted first.

The eviction order is the insertion order, so a snapshot needs no extra state: sorting live
slots by their (monotonic) id rebuilds the queue exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from olm_cli.replay.protocol import Incoming
from olm_cli.replay.slot_list import SlotList

if TYPE_CHECKING:
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.replay.table import SampleTable


class FifoPolicy:
    """Recent data only; draws uniformly."""

    name: ClassVar[str] = "fifo"

    def attach(self, table: SampleTable, rng: np.random.Generator, cfg: ReplayConfig) -> None:
        self.table = table
        self.rng = rng
        self.order = SlotList(table.slot_capacity)

    def admit(self, incoming: Incoming, room: bool) -> bool:
        return True

    def victim(self, incoming: Incoming) -> int:
        return self.order.head

    def on_insert(self, slot: int) -> None:
        self.order.append(slot)

    def on_remove(self, slot: int) -> None:
        self.order.remove(slot)

    def on_replay(self, slots: np.ndarray) -> None:
        pass

    def on_rescore(self, slot: int) -> None:
        pass

    def on_grow(self, slot_capacity: int) -> None:
        self.order.grow(slot_capacity)

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.table.draw_uniform(self.rng, k), np.ones(k)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        live = self.table.live_slots()
        self.order.rebuild(live[np.argsort(self.recency(live), kind="stable")])

    def recency(self, slots: np.ndarray) -> np.ndarray:
        """The eviction order's key (oldest first): the insertion id."""
        return self.table.id[slots]
