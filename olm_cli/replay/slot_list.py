"""An intrusive doubly linked list over slot numbers, for O(1) queue-like eviction orders.

Two int32 arrays (prev/next) instead of Python nodes keep it at 8 bytes per slot. FIFO keeps
slots in insertion order, LRU moves a slot to the tail whenever it is replayed.
"""

from __future__ import annotations

import numpy as np


class SlotList:
    """Ordered set of slots: append at the tail, remove anywhere, read the head."""

    def __init__(self, slot_capacity: int) -> None:
        self.prev = np.full(slot_capacity, -1, dtype=np.int32)
        self.next = np.full(slot_capacity, -1, dtype=np.int32)
        self.head = -1
        self.tail = -1

    def grow(self, slot_capacity: int) -> None:
        for name in ("prev", "next"):
            old = getattr(self, name)
            new = np.full(slot_capacity, -1, dtype=np.int32)
            new[: old.size] = old
            setattr(self, name, new)

    def append(self, slot: int) -> None:
        self.prev[slot] = self.tail
        self.next[slot] = -1
        if self.tail >= 0:
            self.next[self.tail] = slot
        else:
            self.head = slot
        self.tail = slot

    def remove(self, slot: int) -> None:
        before = int(self.prev[slot])
        after = int(self.next[slot])
        if before >= 0:
            self.next[before] = after
        else:
            self.head = after
        if after >= 0:
            self.prev[after] = before
        else:
            self.tail = before
        self.prev[slot] = -1
        self.next[slot] = -1

    def move_to_tail(self, slot: int) -> None:
        if slot != self.tail:
            self.remove(slot)
            self.append(slot)

    def rebuild(self, ordered_slots: np.ndarray) -> None:
        """Set the order in one go (used after restoring a snapshot)."""
        self.prev[:] = -1
        self.next[:] = -1
        self.head = self.tail = -1
        for slot in ordered_slots.tolist():
            self.append(slot)
