"""The replay buffer the engine talks to: one storage engine, one pluggable policy.

``DiskReplayBuffer`` owns everything a policy should not have to think about: token bytes on
disk (:class:`SegmentStore`), per-sample metadata in numpy columns (:class:`SampleTable`), the
seeded generator, capacity accounting and snapshots. The policy (:mod:`policies`) only decides
who enters, who leaves and who is drawn.

Determinism contract: every random choice comes from ``self.rng`` (numpy PCG64 seeded by the
run seed), the generator state is part of each snapshot, and every structure a policy draws
from is restored exactly; so ``load(snapshot)`` followed by the same calls gives the same
samples as the run that wrote the snapshot, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from olm_cli.errors import CheckpointError
from olm_cli.replay.config import ReplayConfig
from olm_cli.replay.policies import REPLAY_POLICIES
from olm_cli.replay.protocol import Incoming, ReplayItem, ReplayPolicy
from olm_cli.replay.snapshot import (
    COLUMNS_DIR,
    FORMAT,
    MANIFEST,
    SEGMENTS,
    STATE_DIR,
    read_arrays,
    read_manifest,
    write_arrays,
    write_json_atomic,
)
from olm_cli.replay.store import SEGMENT_BYTES, SegmentStore, fsync_dir, segment_name
from olm_cli.replay.table import COLUMNS, SampleTable

if TYPE_CHECKING:
    from olm_cli.samples import Block
    from olm_cli.strategy import StrategyContext

_DEFAULT_SCORE = 1.0
_INITIAL_SLOTS = 4096


class DiskReplayBuffer:
    """A bounded, on-disk, checkpointable replay buffer driven by one :class:`ReplayPolicy`.

    Its scratch space ``root`` is ``context.run_dir / "replay" / f"rank{context.rank}"`` (one per
    process: ranks hold the same samples but write their own files); it is wiped on
    construction and on :meth:`load`, because snapshots, not the scratch space, are the source
    of truth. The policy is ``REPLAY_POLICIES[config.policy]`` unless one is given (tests).
    """

    def __init__(
        self,
        config: ReplayConfig,
        context: StrategyContext,
        *,
        policy: ReplayPolicy | None = None,
        segment_bytes: int = SEGMENT_BYTES,
    ) -> None:
        if context.run_dir is None:
            raise ValueError("a replay buffer keeps its samples under context.run_dir; set it")
        self.cfg = config
        self.root = Path(context.run_dir) / "replay" / f"rank{context.rank}"
        self.policy = policy if policy is not None else REPLAY_POLICIES[config.policy]()
        self.rng = np.random.Generator(np.random.PCG64(context.seed))
        self.store = SegmentStore(self.root / SEGMENTS, segment_bytes)
        initial = config.capacity if config.capacity_unit == "samples" else config.capacity // 64
        self.table = SampleTable(max(16, min(initial, _INITIAL_SLOTS)))
        self.policy.attach(self.table, self.rng, config)
        self.step = 0
        self.evicted = 0
        self.rejected = 0

    # -- sizes ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.table.size

    @property
    def num_tokens(self) -> int:
        return self.table.num_tokens

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def _fits(self, length: int) -> bool:
        if self.cfg.capacity_unit == "samples":
            return self.table.size + 1 <= self.cfg.capacity
        return self.table.num_tokens + length <= self.cfg.capacity

    def stats(self) -> dict[str, Any]:
        """Counters for the engine's metrics log."""
        return {
            "policy": self.policy.name,
            "size": self.table.size,
            "tokens": self.table.num_tokens,
            "capacity": self.cfg.capacity,
            "capacity_unit": self.cfg.capacity_unit,
            "seen": self.table.seen,
            "evicted": self.evicted,
            "rejected": self.rejected,
            "disk_bytes": self.store.disk_bytes,
        }

    # -- insertion -----------------------------------------------------------------------
    def add(
        self,
        blocks: Sequence[Block],
        step: int,
        scores: Sequence[float] | None = None,
        logits: Sequence[tuple[np.ndarray, np.ndarray]] | None = None,
    ) -> None:
        """Offer ``blocks`` (seen at training ``step``) to the policy; O(1) per block
        (O(log n) for priority and importance)."""
        if scores is not None and len(scores) != len(blocks):
            raise ValueError(f"{len(scores)} scores for {len(blocks)} blocks")
        if logits is not None and len(logits) != len(blocks):
            raise ValueError(f"{len(logits)} logits entries for {len(blocks)} blocks")
        if not blocks:
            return
        self.step = max(self.step, int(step))
        clean_scores = _clean_scores(scores, len(blocks))
        draws = self.rng.random(len(blocks))
        table = self.table
        for i, block in enumerate(blocks):
            tokens = np.ascontiguousarray(block.tokens, dtype=np.int32)
            length = int(tokens.shape[0])
            if (
                tokens.ndim != 1
                or length == 0
                or (self.cfg.capacity_unit == "tokens" and length > self.cfg.capacity)
            ):
                self.rejected += 1
                continue
            table.seen += 1
            incoming = Incoming(
                length=length,
                domain=table.domain_code(block.domain),
                score=float(clean_scores[i]),
                step=int(step),
                u=float(draws[i]),
            )
            if not self.policy.admit(incoming, self._fits(length)):
                self.rejected += 1
                continue
            while not self._fits(length):
                victim = self.policy.victim(incoming)
                if victim < 0:
                    break
                self._remove(victim)
                self.evicted += 1
            if not self._fits(length):
                self.rejected += 1
                continue
            payload, k = _payload(tokens, None if logits is None else logits[i], self.cfg)
            self._insert(payload, length, k, incoming, block.shard)
        self._maybe_compact()

    def _insert(self, payload: bytes, length: int, k: int, incoming: Incoming, shard: str) -> int:
        table = self.table
        segment, offset = self.store.append(payload)
        slot, grew = table.allocate()
        if grew:
            self.policy.on_grow(table.slot_capacity)
        table.id[slot] = table.next_id
        table.next_id += 1
        table.segment[slot] = segment
        table.offset[slot] = offset
        table.length[slot] = length
        table.logits_k[slot] = k
        table.domain[slot] = incoming.domain
        table.shard[slot] = table.shard_code(shard)
        table.step[slot] = incoming.step
        table.scored_at[slot] = incoming.step
        table.score[slot] = incoming.score
        table.replayed[slot] = 0
        table.clock += 1
        table.last_used[slot] = table.clock
        table.activate(slot)
        table.num_tokens += length
        self.policy.on_insert(slot)
        return slot

    def _remove(self, slot: int) -> None:
        table = self.table
        self.policy.on_remove(slot)
        self.store.release(int(table.segment[slot]), table.nbytes(slot))
        table.num_tokens -= int(table.length[slot])
        table.release(slot)

    def _maybe_compact(self) -> None:
        """Rewrite sparse segments once dead bytes outweigh live ones (amortised O(1))."""
        store = self.store
        dead = store.disk_bytes - store.live_bytes
        if dead <= max(store.live_bytes, store.segment_bytes) and len(store.sizes) <= 256:
            return
        targets = store.sparse_segments()
        if not targets:
            return
        table = self.table
        live = table.live_slots()
        moving = live[np.isin(table.segment[live], targets)]
        for slot in moving.tolist():
            nbytes = table.nbytes(slot)
            old_segment = int(table.segment[slot])
            data = store.read(old_segment, int(table.offset[slot]), nbytes)
            segment, offset = store.append(bytes(data))
            table.segment[slot] = segment
            table.offset[slot] = offset
            store.release(old_segment, nbytes)

    # -- drawing -------------------------------------------------------------------------
    def sample(self, k: int) -> list[ReplayItem]:
        """Draw ``k`` samples by the policy's rule (fewer only if the buffer is empty)."""
        table = self.table
        if k <= 0 or table.size == 0:
            return []
        slots, weights = self.policy.draw(k)
        items = []
        for slot, weight in zip(slots.tolist(), weights.tolist(), strict=True):
            table.replayed[slot] += 1
            table.clock += 1
            table.last_used[slot] = table.clock
            items.append(self._item(slot, weight))
        self.policy.on_replay(slots)
        return items

    def _item(self, slot: int, weight: float = 1.0) -> ReplayItem:
        table = self.table
        length = int(table.length[slot])
        k = int(table.logits_k[slot])
        data = self.store.read(
            int(table.segment[slot]), int(table.offset[slot]), table.nbytes(slot)
        )
        tokens = np.frombuffer(data, dtype=np.int32, count=length)
        values = indices = None
        if k:
            values = np.frombuffer(data, np.float16, length * k, 4 * length).reshape(length, k)
            indices = np.frombuffer(data, np.int32, length * k, 4 * length + 2 * length * k)
            indices = indices.reshape(length, k)
        sample_id = int(table.id[slot])
        table.remember(sample_id, slot)
        return ReplayItem(
            id=sample_id,
            tokens=tokens,
            domain=table.domains[int(table.domain[slot])],
            shard=table.shards[int(table.shard[slot])],
            weight=float(weight),
            logits_values=values,
            logits_indices=indices,
        )

    def update_scores(self, ids: Sequence[int], scores: Sequence[float]) -> None:
        """Re-score samples (e.g. with their loss when replayed); evicted ids are ignored."""
        if len(ids) != len(scores):
            raise ValueError(f"{len(scores)} scores for {len(ids)} ids")
        clean = _clean_scores(scores, len(ids))
        for sample_id, score in zip(ids, clean.tolist(), strict=True):
            slot = self.table.lookup(int(sample_id))
            if slot < 0:
                continue
            self.table.score[slot] = score
            self.table.scored_at[slot] = self.step
            self.policy.on_rescore(slot)

    def items(self) -> Iterable[ReplayItem]:
        """Every sample in the buffer (live order), without counting it as replayed."""
        for slot in self.table.live_slots().copy().tolist():
            yield self._item(slot)

    # -- persistence ---------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        """Write a self-contained snapshot into ``directory`` (absent or empty).

        Token segments are sealed and hard-linked (copied across filesystems), so this costs
        O(segments + samples metadata), not O(tokens). The manifest is written last.
        """
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise CheckpointError(f"replay snapshot directory {directory} is not empty")
        directory.mkdir(parents=True, exist_ok=True)
        self.store.seal()
        segments = self.store.export(directory / SEGMENTS)
        table = self.table
        write_arrays(
            directory / COLUMNS_DIR,
            ((name, table.live_column(name)) for name in ("slot", *COLUMNS)),
        )
        arrays: dict[str, np.ndarray] = {"free": table.free[: table.n_free]}
        scalars: dict[str, Any] = {}
        for key, value in self.policy.state_dict().items():
            if isinstance(value, np.ndarray):
                arrays[f"policy.{key}"] = value
            else:
                scalars[key] = value
        write_arrays(directory / STATE_DIR, arrays.items())
        manifest = {
            "format": FORMAT,
            "policy": self.policy.name,
            "capacity": self.cfg.capacity,
            "capacity_unit": self.cfg.capacity_unit,
            "store_logits_topk": self.cfg.store_logits_topk,
            "step": self.step,
            "evicted": self.evicted,
            "rejected": self.rejected,
            "table": self.table.counters(),
            "segments": {str(s): size for s, size in segments.items()},
            "rng": self.rng.bit_generator.state,
            "policy_state": scalars,
        }
        write_json_atomic(directory / MANIFEST, manifest)
        fsync_dir(directory)

    def load(self, directory: Path) -> None:
        """Become exactly the buffer that wrote ``directory`` (content, counters, RNG)."""
        directory = Path(directory)
        manifest = read_manifest(directory)
        if manifest["policy"] != self.policy.name:
            raise CheckpointError(
                f"replay snapshot {directory} was written by policy {manifest['policy']!r}, "
                f"the recipe asks for {self.policy.name!r}"
            )
        if manifest["capacity_unit"] != self.cfg.capacity_unit:
            raise CheckpointError(
                f"replay snapshot {directory} counts capacity in {manifest['capacity_unit']}, "
                f"the recipe in {self.cfg.capacity_unit}"
            )
        columns = read_arrays(directory / COLUMNS_DIR)
        arrays = read_arrays(directory / STATE_DIR, mmap=False)
        if "free" not in arrays or not {"slot", *COLUMNS} <= columns.keys():
            raise CheckpointError(f"replay snapshot {directory} is incomplete")
        counters = manifest["table"]
        table = SampleTable.restore(columns, arrays["free"], counters)
        del columns
        segments = {int(s): int(size) for s, size in manifest["segments"].items()}
        missing = [s for s in segments if not (directory / SEGMENTS / segment_name(s)).is_file()]
        if missing:
            raise CheckpointError(f"replay snapshot {directory} lacks segments {missing}")
        self.store.adopt(directory / SEGMENTS, segments)
        live = table.live_slots()
        lengths = table.length[live].astype(np.int64)
        nbytes = 4 * lengths + 6 * lengths * table.logits_k[live]
        per_segment = np.bincount(table.segment[live], weights=nbytes)
        for segment in segments:
            self.store.live[segment] = (
                int(per_segment[segment]) if segment < per_segment.size else 0
            )
        self.table = table
        self.rng.bit_generator.state = manifest["rng"]
        self.step = int(manifest["step"])
        self.evicted = int(manifest["evicted"])
        self.rejected = int(manifest["rejected"])
        self.policy.attach(table, self.rng, self.cfg)
        state: dict[str, Any] = dict(manifest["policy_state"])
        for key, value in arrays.items():
            if key.startswith("policy."):
                state[key.removeprefix("policy.")] = value
        self.policy.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        """Empty: all of the buffer's state (generator, counters, table) is in the snapshot.

        Those values describe the samples on disk, so they are written by :meth:`save` next to
        the segments, in one manifest that is replaced atomically; kept apart they could
        disagree with the samples after a crash between the two writes.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore beyond :meth:`load` (see :meth:`state_dict`)."""

    def close(self) -> None:
        """Release file descriptors (the engine calls this in cleanup)."""
        self.store.close()


def _clean_scores(scores: Sequence[float] | None, n: int) -> np.ndarray:
    """float32 scores with NaN -> 0 and +-inf clipped, so trees never see a NaN."""
    if scores is None:
        return np.full(n, _DEFAULT_SCORE, dtype=np.float32)
    values = np.asarray(scores, dtype=np.float64)
    limit = float(np.finfo(np.float32).max)
    return np.nan_to_num(values, nan=0.0, posinf=limit, neginf=-limit).astype(np.float32)


def _payload(
    tokens: np.ndarray, logits: tuple[np.ndarray, np.ndarray] | None, cfg: ReplayConfig
) -> tuple[bytes, int]:
    """Segment bytes of one sample: tokens int32, then top-k values float16, indices int32."""
    if logits is None:
        return tokens.tobytes(), 0
    values, indices = (np.asarray(a) for a in logits)
    length = tokens.shape[0]
    if values.ndim != 2 or values.shape != indices.shape or values.shape[0] != length:
        raise ValueError(
            f"stored logits must be two [L, k] arrays with L = {length}; "
            f"got {values.shape} and {indices.shape}"
        )
    k = int(values.shape[1])
    if cfg.store_logits_topk and k != cfg.store_logits_topk:
        raise ValueError(
            f"stored logits have k = {k}, replay.store_logits_topk = {cfg.store_logits_topk}"
        )
    payload = (
        tokens.tobytes()
        + np.ascontiguousarray(values, dtype=np.float16).tobytes()
        + np.ascontiguousarray(indices, dtype=np.int32).tobytes()
    )
    return payload, k

