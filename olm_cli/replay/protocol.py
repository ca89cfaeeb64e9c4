"""The two contracts of the replay family.

:class:`ReplayBuffer` is what the engine sees: add blocks, draw samples, re-score them, and
snapshot/restore with each checkpoint. :class:`ReplayPolicy` is what one strategy file
implements: *which* samples enter, leave and get drawn. Storage, persistence and bookkeeping
live once in :class:`~olm_cli.replay.buffer.DiskReplayBuffer`, so a new policy is a small file
that never touches the disk format.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # torch-free import: `olm replay-inspect` must start fast
    from olm_cli.replay.config import ReplayConfig
    from olm_cli.replay.table import SampleTable
    from olm_cli.samples import Block


@dataclass
class ReplayItem:
    """One replayed sample as the engine consumes it.

    ``id`` is the buffer's handle for :meth:`ReplayBuffer.update_scores`. ``weight`` is the
    importance weight the engine multiplies into this sample's loss (1.0 except for the
    ``importance`` policy, where its expectation over draws is 1).
    """

    id: int
    tokens: np.ndarray
    domain: str
    shard: str
    weight: float = 1.0
    logits_values: np.ndarray | None = None
    logits_indices: np.ndarray | None = None


@runtime_checkable
class ReplayBuffer(Protocol):
    """What the training engine calls; see docs/replay.md for the step-by-step usage.

    Built by :data:`~olm_cli.replay.registry.REPLAY_BUFFERS` as ``Cls(config, context)``.
    ``save``/``load`` write and read the on-disk snapshot that goes into each checkpoint (the
    samples and every counter that must agree with them); ``state_dict``/``load_state_dict``
    carry in-memory state kept apart from that snapshot (none for the built-in buffers).
    """

    def __len__(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    def add(
        self,
        blocks: Sequence[Block],
        step: int,
        scores: Sequence[float] | None = None,
        logits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None: ...

    def sample(self, k: int) -> list[ReplayItem]: ...

    def update_scores(self, ids: Sequence[int], scores: Sequence[float]) -> None: ...

    def save(self, directory: Path) -> None: ...

    def load(self, directory: Path) -> None: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


@dataclass(slots=True)
class Incoming:
    """A sample offered to the buffer, before it has a slot.

    ``u`` is a uniform draw in [0, 1) made for this sample by the buffer (one vectorised draw
    per ``add`` call keeps insertion cheap); policies use it for their admission coin.
    """

    length: int
    domain: int
    score: float
    step: int
    u: float


class ReplayPolicy(Protocol):
    """Admission, eviction and drawing rule of one policy.

    The buffer calls, per offered sample: ``admit`` (``room`` says whether it fits without
    evicting), then ``victim`` until it fits, ``on_remove`` for each eviction and
    ``on_insert`` once stored. All randomness must come from the generator given to
    ``attach`` so that a restored snapshot replays identically.
    """

    name: ClassVar[str]

    def attach(self, table: SampleTable, rng: np.random.Generator, cfg: ReplayConfig) -> None:
        """Bind to the buffer's metadata table and generator (called once, before use)."""
        ...

    def admit(self, incoming: Incoming, room: bool) -> bool: ...

    def victim(self, incoming: Incoming) -> int:
        """Slot to evict to make room for ``incoming``; -1 means: drop ``incoming`` instead."""
        ...

    def on_insert(self, slot: int) -> None: ...

    def on_remove(self, slot: int) -> None: ...

    def on_replay(self, slots: np.ndarray) -> None: ...

    def on_rescore(self, slot: int) -> None: ...

    def on_grow(self, slot_capacity: int) -> None:
        """The table now has ``slot_capacity`` slots; resize per-slot structures."""
        ...

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``k`` slots to replay and their importance weights (float64)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Numpy arrays go to safetensors, everything else to JSON."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Called after the table has been restored."""
        ...
