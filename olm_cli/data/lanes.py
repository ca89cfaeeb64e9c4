"""Lanes: each rank reads, tokenises and packs its own part of the stream; every rank trains the whole batch.

An increment's shard plan is split into ``K`` lanes (``data.lanes``; :func:`assign_lanes`, by
bytes). Each lane is a stream of its own (a :class:`~olm_cli.data.BlockStream` behind a
read-ahead worker) over its shards, so a block never spans two lanes. Rank ``r`` of ``N`` owns
the lanes ``l`` with ``l % N == r`` and is the only one to read them.

The stream the engine sees, the **global sequence**, depends on the lanes alone, never on ``N``:
a round robin over the lanes, one block from each in turn, starting at a cursor saved with
the position, and a lane that has run out drops out of the turn. :meth:`LaneStream.take`
works out how many of the next ``n`` turns fall to each lane, the owners take that many
blocks, and one all-gather gives every rank every lane's blocks (with whether the lane ran
out, its estimate of what is left, and the shards it finished with their long-document counts
and bad-record reasons). A lane that gave fewer blocks than asked has run out: the turns after
it go to the others, in another round (every rank decides alike, from gathered data only). No
block is ever held back, so a position is just the lanes' positions and the cursor, and the
same blocks follow whatever the world size of the run that continues it.

With one lane the sequence is exactly that lane's stream, and its position is saved in the
plain :class:`~olm_cli.data.BlockStream` format, so a single process reads as it did before
lanes existed. With one process there is no exchange.

Every call that takes, reads ahead or saves is a collective (:meth:`~LaneStream.take`,
:meth:`~LaneStream.at_end`, :meth:`~LaneStream.state_dict`, :meth:`~LaneStream.load_state_dict`,
and :meth:`~LaneStream.remaining_blocks_estimate` before the first exchange): every rank makes
them in the same order. The rest answers from gathered data.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from olm_cli.data.stream import (
    LANES_FORMAT,
    assign_lanes,
    is_lane_position,
    lane_positions,
    shard_bytes,
)
from olm_cli.errors import DataError
from olm_cli.samples import Block

ShardFacts = tuple[dict[str, int], str | None]  # long-document counts, bad-record reason


class LaneExchange(Protocol):
    """Gathers every rank's ``{lane: value}`` into one dict on every rank."""

    rank: int
    world: int

    def gather(self, payload: dict[int, Any]) -> dict[int, Any]: ...


class LocalExchange:
    """One process: nothing to exchange."""

    rank = 0
    world = 1

    def gather(self, payload: dict[int, Any]) -> dict[int, Any]:
        return dict(payload)


class GlooExchange:
    """``all_gather_object`` on a gloo group of all ranks, made once (so it also runs when the
    default group is NCCL: the blocks are host memory, and stay there)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo")

    def gather(self, payload: dict[int, Any]) -> dict[int, Any]:
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, payload, group=self.group)
        merged: dict[int, Any] = {}
        for part in parts:
            merged.update(part)
        return merged


def lane_exchange() -> LaneExchange:
    """The exchange for this process: gloo across the ranks of an initialised process group, else local."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GlooExchange()
    return LocalExchange()


@dataclass
class _Report:
    """What the owner of a lane tells every rank after reading it."""

    blocks: list[Block]
    exhausted: bool
    estimate: float | None
    finished: list[str]
    facts: dict[str, ShardFacts] = field(default_factory=dict)


@dataclass
class _Failure:
    """A lane's owner failed (a bad file, a vanished shard): every rank stops with its message."""

    rank: int
    data_error: bool  # a DataError: the same one-line error on every rank
    message: str


@dataclass
class ReadCounts:
    """What this rank read itself (its own lanes), for the summary that shows the work is split."""

    blocks: int = 0
    tokens: int = 0
    shards: set[str] = field(default_factory=set)


class LaneStream:
    """The training stream split into lanes (see the module docstring); a :class:`~olm_cli.pipeline.BlockSource`.

    ``make_lane(shards, lanes)`` builds the stream of one lane (``lanes``: how many there are,
    to size its read-ahead). ``lanes`` is the count for a fresh increment; a loaded position
    brings its own.
    """

    def __init__(self, plan: Sequence[Path | str], make_lane: Callable[[list[Path], int], Any], *, lanes: int,
                 exchange: LaneExchange | None = None) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, got {lanes}")
        self.plan = [str(p) for p in plan]
        self.make_lane = make_lane
        self.exchange: LaneExchange = exchange or LocalExchange()
        self._warn: Callable[[str], None] | None = None
        self.read = ReadCounts()
        self._lanes: dict[int, Any] = {}
        self._build(assign_lanes(self.plan, lanes), None, cursor=0)

    # -- the lanes ---------------------------------------------------------------------------

    @property
    def lanes(self) -> int:
        return len(self._shards)

    @property
    def owned(self) -> list[int]:
        """The lanes this rank reads."""
        return sorted(self._lanes)

    def lane_shards(self, lane: int) -> list[str]:
        return list(self._shards[lane])

    def _build(self, shards: list[list[str]], states: list[dict[str, Any]] | None, *, cursor: int) -> None:
        self.close()
        self._shards = shards
        world, rank = self.exchange.world, self.exchange.rank
        self._lanes = {lane: self.make_lane([Path(s) for s in shards[lane]], len(shards))
                       for lane in range(len(shards)) if lane % world == rank}
        for lane, stream in self._lanes.items():
            stream.warn = self._warn
            if states is not None:
                stream.load_state_dict(states[lane])
        self._cursor = cursor % len(shards)
        self._exhausted = [False] * len(shards)  # known to have no block left
        self._estimates: list[float | None] | None = None  # the lanes' latest, once gathered
        self._finished: list[str] = []
        self._facts: dict[str, ShardFacts] = {}
        for state in states or []:  # what the saved positions know of finished shards
            unit = state.get("unit") or {}
            for shard, counts in (unit.get("long_documents") or {}).items():
                self._facts[str(shard)] = ({k: int(v) for k, v in counts.items()}, None)
            for shard, reason in (unit.get("problems") or {}).items():
                self._facts[str(shard)] = (self._facts.get(str(shard), ({"split": 0, "skipped": 0}, None))[0], str(reason))
        self._idle_warning_due = world > len(shards)

    # -- the stream interface ----------------------------------------------------------------

    @property
    def warn(self) -> Callable[[str], None] | None:
        return self._warn

    @warn.setter
    def warn(self, value: Callable[[str], None] | None) -> None:
        self._warn = value
        for stream in self._lanes.values():
            stream.warn = value

    @property
    def exhausted(self) -> bool:
        return all(self._exhausted)

    def take(self, n: int) -> list[Block]:
        """The next ``n`` blocks of the global sequence (fewer only when every lane has run out)."""
        self._warn_idle()
        out: list[Block] = []
        fetched: dict[int, deque[Block]] = {lane: deque() for lane in range(self.lanes)}
        while len(out) < n and not all(self._exhausted):
            turns = self._turns(n - len(out))
            asked = {lane: max(0, count - len(fetched[lane])) for lane, count in turns.items()}
            reports = self._exchange(asked)
            for lane, report in sorted(reports.items()):
                fetched[lane].extend(report.blocks)
                if len(report.blocks) < asked.get(lane, 0):
                    self._exhausted[lane] = True
            self._deal(fetched, out, n)
        assert not any(fetched.values()), "every block read in a take is handed out in it"
        return out

    def at_end(self) -> bool:
        """True when no lane has a block left; the owners read ahead to find out."""
        self._exchange({}, peek=True)
        return self.exhausted

    def take_finished_shards(self) -> list[str]:
        finished, self._finished = self._finished, []
        return finished

    def long_document_counts(self, shard: str) -> dict[str, int]:
        facts = self._facts.get(shard)
        return dict(facts[0]) if facts is not None else {"split": 0, "skipped": 0}

    def shard_problem(self, shard: str) -> str | None:
        facts = self._facts.get(shard)
        return facts[1] if facts is not None else None

    def remaining_blocks_estimate(self) -> float | None:
        if self._estimates is None:
            self._exchange({})
        assert self._estimates is not None
        if any(estimate is None for estimate in self._estimates):
            return None
        return float(sum(e for e in self._estimates if e is not None))

    def state_dict(self) -> dict[str, Any]:
        """Every lane's position, gathered to every rank (a collective); one lane saves plain."""
        gathered = self._gather(lambda: {lane: stream.state_dict() for lane, stream in self._lanes.items()})
        states = [gathered[lane] for lane in range(self.lanes)]
        if self.lanes == 1:
            return states[0]
        return {"format": LANES_FORMAT, "shards": list(self.plan), "lanes": states, "cursor": self._cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a saved position, whatever the world size that saved it (a collective).

        Each rank builds and loads the lanes it owns now; a plain position (one lane, or one
        written before lanes existed) is one lane.
        """
        if [str(s) for s in state["shards"]] != self.plan:
            raise DataError("the data position in the checkpoint belongs to a different shard plan")
        states = lane_positions(state)
        cursor = int(state.get("cursor", 0)) if is_lane_position(state) else 0
        shards = [[str(s) for s in lane["shards"]] for lane in states]

        def load() -> dict[int, Any]:
            self._build(shards, states, cursor=cursor)
            return {lane: stream.exhausted for lane, stream in self._lanes.items()}

        known = self._gather(load)
        self._exhausted = [bool(known[lane]) for lane in range(self.lanes)]

    def close(self) -> None:
        for stream in self._lanes.values():
            close = getattr(stream, "close", None)
            if close is not None:
                close()

    # -- the global sequence -----------------------------------------------------------------

    def _turn_order(self) -> list[int]:
        """The lanes still in the round robin, starting at the cursor."""
        k = self.lanes
        return [lane for lane in ((self._cursor + i) % k for i in range(k)) if not self._exhausted[lane]]

    def _turns(self, n: int) -> dict[int, int]:
        """How many of the next ``n`` turns fall to each lane still in the round robin."""
        order = self._turn_order()
        whole, extra = divmod(n, len(order))
        return {lane: whole + (i < extra) for i, lane in enumerate(order)}

    def _deal(self, fetched: dict[int, deque[Block]], out: list[Block], n: int) -> None:
        """Hand out fetched blocks in turn order until ``n``, or until a lane that may still
        have blocks has none fetched (another round asks it); lanes that ran out drop out."""
        k = self.lanes
        lane = self._cursor
        while len(out) < n:
            if fetched[lane]:
                out.append(fetched[lane].popleft())
            elif not self._exhausted[lane] or not any(fetched.values()):
                break  # its turn needs another round, or nothing is left at all
            lane = (lane + 1) % k
            self._cursor = lane

    def _exchange(self, asked: dict[int, int], *, peek: bool = False) -> dict[int, _Report]:
        """The owners take ``asked`` blocks from their lanes (or read ahead, ``peek``); every rank
        gets every lane's report, and the known ends, estimates and finished shards are updated."""
        reports: dict[int, _Report] = self._gather(lambda: self._read_lanes(asked, peek=peek))
        estimates: list[float | None] = [None] * self.lanes
        for lane in range(self.lanes):
            report = reports[lane]
            self._exhausted[lane] = self._exhausted[lane] or report.exhausted
            estimates[lane] = report.estimate
            self._finished.extend(report.finished)
            self._facts.update(report.facts)
        self._estimates = estimates
        return reports

    def _read_lanes(self, asked: dict[int, int], *, peek: bool) -> dict[int, _Report]:
        """This rank's part of an exchange: take from (or read ahead on) its own lanes."""
        local: dict[int, _Report] = {}
        for lane, stream in self._lanes.items():
            count = asked.get(lane, 0)
            blocks = stream.take(count) if count else []
            # at_end() also on a lane known to have ended: its reader then closes its last unit.
            ended = stream.at_end() if peek else stream.exhausted
            finished = stream.take_finished_shards()
            facts = {shard: (stream.long_document_counts(shard), stream.shard_problem(shard)) for shard in finished}
            local[lane] = _Report(blocks, ended, stream.remaining_blocks_estimate(), finished, facts)
            self.read.blocks += len(blocks)
            self.read.tokens += sum(len(block) for block in blocks)
            self.read.shards.update(shard for block in blocks for shard, _ in block.token_spans())
            self.read.shards.update(finished)
        return local

    def _gather(self, work: Callable[[], dict[int, Any]]) -> dict[int, Any]:
        """``work()`` on this rank's lanes, gathered; if it failed on any rank, every rank raises.

        Only a lane's owner reads it, so only the owner meets a bad file: were it to raise alone,
        the other ranks would wait in the all-gather for ever. The failure travels in the
        gather instead (the failing rank re-raises its own exception).
        """
        failure: BaseException | None = None
        try:
            payload = work()
        except Exception as exc:
            failure = exc
            payload = {-1 - self.exchange.rank: _Failure(self.exchange.rank, isinstance(exc, DataError), str(exc))}
        gathered = self.exchange.gather(payload)
        failed = [value for value in gathered.values() if isinstance(value, _Failure)]
        if failure is not None:
            raise failure
        if failed:
            first = failed[0]
            if first.data_error:
                raise DataError(first.message)
            raise RuntimeError(f"rank {first.rank} failed reading its data lanes: {first.message}")
        return gathered

    # -- reporting ---------------------------------------------------------------------------

    def _warn_idle(self) -> None:
        if not self._idle_warning_due:
            return
        self._idle_warning_due = False
        if self._warn is not None:
            world, k = self.exchange.world, self.lanes
            idle = f"rank {k}" if world - k == 1 else f"ranks {k}-{world - 1}"
            self._warn(f"the data is split into {k} lane(s) for {world} processes: {idle} read no data "
                       f"(they train their share of every batch from blocks the others read); data.lanes: auto "
                       f"splits a new increment into one lane per process (a carried data position keeps its count)")

    def reading_summary(self) -> str | None:
        """Who read what in this invocation (a collective), one line; None with one process."""
        if self.exchange.world == 1:
            return None
        mine = (self.owned, len(self.read.shards), sum(shard_bytes(Path(s)) for s in self.read.shards),
                self.read.tokens)
        every = self.exchange.gather({self.exchange.rank: mine})
        parts = []
        for rank in range(self.exchange.world):
            lanes, shards, size, tokens = every[rank]
            which = "no lane" if not lanes else f"lane{'s' if len(lanes) > 1 else ''} {','.join(map(str, lanes))}"
            parts.append(f"rank {rank}: {which}, {shards} shard(s), {size:,} bytes, {tokens:,} tokens")
        return f"data read in {self.lanes} lane(s): " + "; ".join(parts)
