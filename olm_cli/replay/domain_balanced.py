"""Domain-balanced: every domain seen so far gets an equal share of the capacity.

A domain under its share takes room from the domain that uses most; a domain at its share
runs its own reservoir (Algorithm R on that domain's stream), so what it keeps is a uniform
sample of that domain. Draws pick a domain uniformly among the non-empty ones, then a sample
uniformly inside it, so replay is balanced even while the content is still converging.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from olm_cli.replay.protocol import Incoming

if TYPE_CHECKING:
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.replay.table import SampleTable


class DomainBalancedPolicy:
    """Equal share per domain; draws domain-uniformly."""

    name: ClassVar[str] = "domain_balanced"

    def attach(self, table: SampleTable, rng: np.random.Generator, cfg: ReplayConfig) -> None:
        self.table = table
        self.rng = rng
        self.capacity = cfg.capacity
        self.by_tokens = cfg.capacity_unit == "tokens"
        self.members: list[np.ndarray] = []  # per domain: its live slots, dense
        self.count: list[int] = []
        self.usage: list[int] = []  # samples or tokens, in the capacity unit
        self.seen: list[int] = []
        self.pos = np.full(table.slot_capacity, -1, dtype=np.int32)

    def _ensure(self, domain: int) -> None:
        while len(self.members) <= domain:
            self.members.append(np.zeros(16, dtype=np.int32))
            self.count.append(0)
            self.usage.append(0)
            self.seen.append(0)

    def _cost(self, length: int) -> int:
        return length if self.by_tokens else 1

    def _over_share(self, incoming: Incoming) -> bool:
        domain = incoming.domain
        quota = self.capacity / len(self.seen)
        return self.usage[domain] + self._cost(incoming.length) > quota

    def admit(self, incoming: Incoming, room: bool) -> bool:
        domain = incoming.domain
        self._ensure(domain)
        self.seen[domain] += 1
        if room or not self._over_share(incoming):
            return True
        return incoming.u * self.seen[domain] < self.count[domain]

    def victim(self, incoming: Incoming) -> int:
        domain = incoming.domain
        if not (self._over_share(incoming) and self.count[domain] > 0):
            domain = int(np.argmax(self.usage))
        if self.count[domain] == 0:
            return -1
        j = int(self.rng.integers(0, self.count[domain]))
        return int(self.members[domain][j])

    def on_insert(self, slot: int) -> None:
        domain = int(self.table.domain[slot])
        self._ensure(domain)
        members = self.members[domain]
        n = self.count[domain]
        if n == members.size:
            members = self.members[domain] = np.concatenate([members, np.zeros_like(members)])
        members[n] = slot
        self.pos[slot] = n
        self.count[domain] = n + 1
        self.usage[domain] += self._cost(int(self.table.length[slot]))

    def on_remove(self, slot: int) -> None:
        domain = int(self.table.domain[slot])
        members = self.members[domain]
        p = int(self.pos[slot])
        last = int(members[self.count[domain] - 1])
        members[p] = last
        self.pos[last] = p
        self.pos[slot] = -1
        self.count[domain] -= 1
        self.usage[domain] -= self._cost(int(self.table.length[slot]))

    def on_replay(self, slots: np.ndarray) -> None:
        pass

    def on_rescore(self, slot: int) -> None:
        pass

    def on_grow(self, slot_capacity: int) -> None:
        pos = np.full(slot_capacity, -1, dtype=np.int32)
        pos[: self.pos.size] = self.pos
        self.pos = pos

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        nonempty = np.flatnonzero(np.asarray(self.count) > 0)
        picks = nonempty[self.rng.integers(0, nonempty.size, size=k)]
        slots = np.empty(k, dtype=np.int64)
        for domain in np.unique(picks).tolist():
            where = np.flatnonzero(picks == domain)
            n = self.count[domain]
            if where.size <= n:
                chosen = self.rng.choice(n, size=where.size, replace=False)
            else:
                chosen = self.rng.integers(0, n, size=where.size)
            slots[where] = self.members[domain][chosen]
        return slots, np.ones(k)

    def state_dict(self) -> dict[str, Any]:
        ordered = [m[:c] for m, c in zip(self.members, self.count, strict=True)]
        return {
            "members": np.concatenate(ordered) if ordered else np.zeros(0, dtype=np.int32),
            "count": np.asarray(self.count, dtype=np.int64),
            "seen": np.asarray(self.seen, dtype=np.int64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.members, self.count, self.usage, self.seen = [], [], [], []
        self.pos = np.full(self.table.slot_capacity, -1, dtype=np.int32)
        flat = np.asarray(state["members"], dtype=np.int32)
        start = 0
        counts = np.asarray(state["count"]).tolist()
        for domain, (n, seen) in enumerate(
            zip(counts, np.asarray(state["seen"]).tolist(), strict=True)
        ):
            self._ensure(domain)
            slots = flat[start : start + n]
            self.members[domain] = np.zeros(max(16, n), dtype=np.int32)
            self.members[domain][:n] = slots
            self.pos[slots] = np.arange(n, dtype=np.int32)
            self.count[domain] = n
            self.usage[domain] = int(self.table.length[slots].sum()) if self.by_tokens else n
            start += n
            self.seen[domain] = seen
