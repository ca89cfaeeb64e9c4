"""LRU: evict the sample replayed least recently.

A sample's recency is the buffer clock at its insertion or at its last replay, whichever is
later, so samples that were never replayed go first (oldest first) and replaying a sample
protects it. Draws are uniform. The clock is a table column, so a snapshot rebuilds the order
by sorting on it.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from olm_cli.replay.fifo import FifoPolicy


class LruPolicy(FifoPolicy):
    """Least-recently-replayed eviction; draws uniformly. FIFO plus "a replay renews a sample"."""

    name: ClassVar[str] = "lru"

    def on_replay(self, slots: np.ndarray) -> None:
        for slot in slots.tolist():
            self.order.move_to_tail(slot)

    def recency(self, slots: np.ndarray) -> np.ndarray:
        return self.table.last_used[slots]
