"""Per-sample metadata kept in RAM as compact numpy columns, one row per slot.

Token data lives on disk (:mod:`olm_cli.replay.store`); this table is what makes a 1M-sample
buffer cheap: about 76 bytes per slot, no Python object per sample. Slots are reused through a
free stack; the live slots are also kept in a dense array (``live``) so that a uniform draw or
a uniform eviction is one random index, O(1).
"""

from __future__ import annotations

import numpy as np

INT64_COLUMNS = ("id", "offset", "step", "scored_at", "last_used")
INT32_COLUMNS = ("segment", "length", "logits_k", "replayed", "domain", "shard")
FLOAT32_COLUMNS = ("score",)
COLUMNS = INT64_COLUMNS + INT32_COLUMNS + FLOAT32_COLUMNS

_LOOKUP_CACHE_MAX = 1 << 16


def _dtype(column: str) -> type[np.generic]:
    if column in INT64_COLUMNS:
        return np.int64
    if column in INT32_COLUMNS:
        return np.int32
    return np.float32


class SampleTable:
    """Columns indexed by slot, the dense live list, string tables and buffer counters."""

    id: np.ndarray
    offset: np.ndarray
    step: np.ndarray
    scored_at: np.ndarray
    last_used: np.ndarray
    segment: np.ndarray
    length: np.ndarray
    logits_k: np.ndarray
    replayed: np.ndarray
    domain: np.ndarray
    shard: np.ndarray
    score: np.ndarray

    def __init__(self, slot_capacity: int = 1024) -> None:
        self.slot_capacity = max(1, slot_capacity)
        for column in COLUMNS:
            setattr(self, column, np.zeros(self.slot_capacity, dtype=_dtype(column)))
        self.id[:] = -1
        self.live = np.zeros(self.slot_capacity, dtype=np.int32)
        self.pos = np.full(self.slot_capacity, -1, dtype=np.int32)
        self.free = np.zeros(self.slot_capacity, dtype=np.int32)
        self.n_free = 0
        self.size = 0
        self.hwm = 0  # slots [0, hwm) have been handed out at least once
        self.num_tokens = 0
        self.seen = 0  # samples offered to the buffer, admitted or not
        self.next_id = 0
        self.clock = 0  # bumped on every insert and replay; orders LRU
        self.domains: list[str] = []
        self.shards: list[str] = []
        self._domain_codes: dict[str, int] = {}
        self._shard_codes: dict[str, int] = {}
        self._recent: dict[int, int] = {}

    def __len__(self) -> int:
        return self.size

    # -- string tables -------------------------------------------------------------------
    def domain_code(self, name: str) -> int:
        code = self._domain_codes.get(name)
        if code is None:
            code = self._domain_codes[name] = len(self.domains)
            self.domains.append(name)
        return code

    def shard_code(self, name: str) -> int:
        code = self._shard_codes.get(name)
        if code is None:
            code = self._shard_codes[name] = len(self.shards)
            self.shards.append(name)
        return code

    # -- slots ---------------------------------------------------------------------------
    def allocate(self) -> tuple[int, bool]:
        """A free slot, and whether the table had to grow (policies then resize too)."""
        if self.n_free:
            self.n_free -= 1
            return int(self.free[self.n_free]), False
        grew = False
        if self.hwm == self.slot_capacity:
            self.grow(self.slot_capacity * 2)
            grew = True
        slot = self.hwm
        self.hwm += 1
        return slot, grew

    def grow(self, slot_capacity: int) -> None:
        old = self.slot_capacity
        if slot_capacity <= old:
            return
        for column in COLUMNS:
            array = np.zeros(slot_capacity, dtype=_dtype(column))
            array[:old] = getattr(self, column)
            setattr(self, column, array)
        self.id[old:] = -1
        live = np.zeros(slot_capacity, dtype=np.int32)
        live[:old] = self.live
        self.live = live
        pos = np.full(slot_capacity, -1, dtype=np.int32)
        pos[:old] = self.pos
        self.pos = pos
        free = np.zeros(slot_capacity, dtype=np.int32)
        free[:old] = self.free
        self.free = free
        self.slot_capacity = slot_capacity

    def activate(self, slot: int) -> None:
        self.live[self.size] = slot
        self.pos[slot] = self.size
        self.size += 1

    def release(self, slot: int) -> None:
        """Swap-remove from the live list and push on the free stack, O(1)."""
        p = int(self.pos[slot])
        last = int(self.live[self.size - 1])
        self.live[p] = last
        self.pos[last] = p
        self.size -= 1
        self.pos[slot] = -1
        self.id[slot] = -1
        self.free[self.n_free] = slot
        self.n_free += 1

    def live_slots(self) -> np.ndarray:
        return self.live[: self.size]

    def nbytes(self, slot: int) -> int:
        """Bytes the sample occupies in the segment log: tokens, then logits values, indices."""
        n = int(self.length[slot])
        return 4 * n + 6 * n * int(self.logits_k[slot])

    def draw_uniform(self, rng: np.random.Generator, k: int) -> np.ndarray:
        """``k`` live slots, distinct when ``k <= len``; the rule of every unweighted policy."""
        if k <= self.size:
            positions = rng.choice(self.size, size=k, replace=False)
        else:
            positions = rng.integers(0, self.size, size=k)
        return self.live[positions]

    # -- ids -----------------------------------------------------------------------------
    def remember(self, sample_id: int, slot: int) -> None:
        """Cache id -> slot for recently drawn samples, the ones update_scores will name."""
        if len(self._recent) >= _LOOKUP_CACHE_MAX:
            self._recent.clear()
        self._recent[sample_id] = slot

    def lookup(self, sample_id: int) -> int:
        """Slot holding ``sample_id``, or -1 if it has been evicted."""
        slot = self._recent.get(sample_id)
        if slot is not None and self.id[slot] == sample_id:
            return slot
        hits = np.flatnonzero(self.id[: self.hwm] == sample_id)
        return int(hits[0]) if hits.size else -1

    # -- persistence ---------------------------------------------------------------------
    def live_column(self, name: str) -> np.ndarray:
        """One metadata column for the live rows, in live-list order (what draws index).

        Snapshots write column by column so that saving never holds more than one extra
        column in memory.
        """
        slots = self.live_slots()
        return slots.copy() if name == "slot" else getattr(self, name)[slots]

    def counters(self) -> dict[str, int | list[str]]:
        return {
            "size": self.size,
            "hwm": self.hwm,
            "slot_capacity": self.slot_capacity,
            "num_tokens": self.num_tokens,
            "seen": self.seen,
            "next_id": self.next_id,
            "clock": self.clock,
            "domains": list(self.domains),
            "shards": list(self.shards),
        }

    @classmethod
    def restore(
        cls, columns: dict[str, np.ndarray], free: np.ndarray, counters: dict
    ) -> SampleTable:
        table = cls(int(counters["slot_capacity"]))
        slots = np.asarray(columns["slot"], dtype=np.int32)
        for column in COLUMNS:
            getattr(table, column)[slots] = columns[column]
        table.size = int(slots.size)
        table.live[: table.size] = slots
        table.pos[slots] = np.arange(table.size, dtype=np.int32)
        table.n_free = int(free.size)
        table.free[: table.n_free] = free
        table.hwm = int(counters["hwm"])
        table.num_tokens = int(counters["num_tokens"])
        table.seen = int(counters["seen"])
        table.next_id = int(counters["next_id"])
        table.clock = int(counters["clock"])
        for name in counters["domains"]:
            table.domain_code(name)
        for name in counters["shards"]:
            table.shard_code(name)
        return table
