"""Warm start: fill an empty buffer from existing shards before the first training step.

Why the engine tokenizes and this module only inserts: tokenization, block packing and shard
discovery are the data layer's job; the buffer just needs blocks. ``expand_seed_paths`` turns
the recipe's ``seed_from`` patterns into files so that a typo fails before training starts.
"""

from __future__ import annotations

import glob
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from olm_cli.errors import DataError
from olm_cli.replay.protocol import ReplayBuffer

if TYPE_CHECKING:
    from olm_cli.samples import Block

_CHUNK = 256


def expand_seed_paths(patterns: Iterable[str], base: Path | None = None) -> list[Path]:
    """Files matched by ``replay.seed_from`` (relative patterns resolve against ``base``).

    Sorted per pattern and de-duplicated so the warm start is reproducible.
    """
    found: list[Path] = []
    for pattern in patterns:
        full = pattern if Path(pattern).is_absolute() or base is None else str(base / pattern)
        matches = sorted(Path(p) for p in glob.glob(full, recursive=True) if Path(p).is_file())
        if not matches:
            raise DataError(f"replay.seed_from: {pattern!r} matches no file")
        found.extend(m for m in matches if m not in found)
    return found


def seed_buffer(
    buffer: ReplayBuffer,
    blocks: Iterable[Block],
    max_samples: int | None = None,
    step: int = 0,
) -> int:
    """Offer the first ``max_samples`` blocks to ``buffer`` (as if seen at ``step``).

    Returns how many blocks were offered; the policy may keep fewer (capacity, admission).
    Pass ``cfg.seed_samples`` as ``max_samples``.
    """
    source = iter(blocks if max_samples is None else islice(blocks, max_samples))
    offered = 0
    while chunk := list(islice(source, _CHUNK)):
        buffer.add(chunk, step=step)
        offered += len(chunk)
    return offered
