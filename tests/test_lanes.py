"""The stream split into lanes (olm_cli/data/lanes.py), in one process.

Several ranks are simulated by threads that exchange through a barrier, the way
``all_gather_object`` does between processes; tests/test_distributed_lanes.py runs real ones.
The reference for every test is computed by hand: each lane read alone by a plain
:class:`BlockStream`, then dealt round robin.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import DOMAIN_PATTERN, make_documents, write_jsonl

from olm_cli.data import (
    BlockStream,
    assign_lanes,
    is_lane_position,
    position_has_work,
    position_owned_shards,
    position_unread_shards,
    rebase_position,
)
from olm_cli.data.lanes import LaneStream
from olm_cli.errors import DataError
from olm_cli.pipeline import PrefetchStream, ShuffleStream, json_position

SIZES = [1, 4, 2, 7, 3, 3, 5, 1, 500, 4]



@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    # Shards of unequal sizes in two domains, and a tiny one.
    paths = [write_jsonl(tmp_path / f"{i % 2:02d}-{'alpha' if i % 2 == 0 else 'beta'}" / f"s{i}.jsonl",
                         make_documents("alpha" if i % 2 == 0 else "beta", 2 + 3 * (i % 4), i)) for i in range(7)]
    paths.append(write_jsonl(tmp_path / "00-alpha" / "tiny.jsonl", ["a b"]))
    return sorted(paths)


def _plain(shards: list[Path], tokenizer: Any) -> BlockStream:
    return BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, bad_records="quarantine")


def _lane_maker(tokenizer: Any, *, depth: int = 0) -> Callable[[list[Path], int], Any]:
    def make(shards: list[Path], lanes: int) -> Any:
        if depth == 0:
            return _plain(shards, tokenizer)
        return PrefetchStream(_plain(shards, tokenizer), replica=lambda: _plain(shards, tokenizer),
                              chunk_blocks=3, depth=depth)
    return make


def _by_hand(shards: list[Path], tokenizer: Any, lanes: int) -> list[list[int]]:
    """The global sequence: each lane's blocks read alone, dealt one per lane in turn, a lane
    leaving the turn once it has none left."""
    queues = [[b.tokens.tolist() for b in _plain([Path(s) for s in lane], tokenizer).take(10**6)]
              for lane in assign_lanes(shards, lanes)]
    out: list[list[int]] = []
    while any(queues):
        for queue in queues:
            if queue:
                out.append(queue.pop(0))
    return out


def _drain(stream: Any, sizes: list[int]) -> tuple[list[list[int]], list[str]]:
    blocks: list[list[int]] = []
    finished: list[str] = []
    for n in sizes:
        blocks += [b.tokens.tolist() for b in stream.take(n)]
        finished += stream.take_finished_shards()
    return blocks, finished


class _Hub:
    """An all-gather between threads (one per simulated rank)."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list[dict[int, Any]] = [{} for _ in range(world)]

    def member(self, rank: int) -> Any:
        hub = self

        class Member:
            def __init__(self) -> None:
                self.rank, self.world = rank, hub.world

            def gather(self, payload: dict[int, Any]) -> dict[int, Any]:
                hub.slots[rank] = dict(payload)
                hub.barrier.wait()
                merged: dict[int, Any] = {}
                for slot in hub.slots:
                    merged.update(slot)
                hub.barrier.wait()  # nobody overwrites a slot before everyone has read them
                return merged

        return Member()


def _on_ranks(world: int, body: Callable[[Any], Any]) -> list[Any]:
    """Run ``body(exchange)`` on ``world`` threads at once; their results by rank."""
    hub = _Hub(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def run(rank: int) -> None:
        try:
            results[rank] = body(hub.member(rank))
        except BaseException as exc:
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


# --------------------------------------------------------------------------- the split


def test_lanes_balance_bytes_and_keep_plan_order(tmp_path: Path) -> None:
    sizes = [5, 40, 12, 40, 7, 1]
    paths = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"s{i}.txt"
        path.write_text("x" * size)
        paths.append(path)
    lanes = assign_lanes(paths, 2)
    # Largest first: s1 -> lane 0, s3 -> lane 1, s2 -> lane 0 (40 vs 40: fewer shards? equal: lower index), ...
    assert lanes == [[str(paths[i]) for i in (1, 2, 5)], [str(paths[i]) for i in (0, 3, 4)]]
    assert sorted(s for lane in lanes for s in lane) == sorted(map(str, paths))
    assert assign_lanes(paths, 1) == [[str(p) for p in paths]]
    assert assign_lanes(paths[:1], 3) == [[str(paths[0])], [], []]
    with pytest.raises(ValueError, match="at least 1"):
        assign_lanes(paths, 0)


@pytest.mark.parametrize("lanes", [2, 3, 5, 12])
def test_one_process_gives_the_lanes_dealt_in_turn(shards: list[Path], tokenizer: Any, lanes: int) -> None:
    stream = LaneStream(shards, _lane_maker(tokenizer), lanes=lanes)
    blocks, finished = _drain(stream, SIZES)
    assert blocks == _by_hand(shards, tokenizer, lanes)
    assert sorted(finished) == sorted(map(str, shards))  # every shard finished, each once
    assert stream.exhausted and stream.at_end() and stream.remaining_blocks_estimate() == 0.0


def test_one_lane_is_the_plain_stream_and_saves_its_position(shards: list[Path], tokenizer: Any) -> None:
    plain, lane = _plain(shards, tokenizer), LaneStream(shards, _lane_maker(tokenizer, depth=2), lanes=1)
    for n in SIZES[:4]:
        assert [b.tokens.tolist() for b in lane.take(n)] == [b.tokens.tolist() for b in plain.take(n)]
        assert lane.take_finished_shards() == plain.take_finished_shards()
        assert lane.remaining_blocks_estimate() == plain.remaining_blocks_estimate()
    state = lane.state_dict()
    assert not is_lane_position(state) and state == plain.state_dict()
    lane.close()


@pytest.mark.parametrize("depth", [0, 2])
def test_a_position_mid_lane_continues_bit_for_bit(shards: list[Path], tokenizer: Any, depth: int) -> None:
    whole, _ = _drain(LaneStream(shards, _lane_maker(tokenizer), lanes=3), SIZES)
    first = LaneStream(shards, _lane_maker(tokenizer, depth=depth), lanes=3)
    head, _ = _drain(first, SIZES[:5])  # 17 blocks: the lanes are mid-shard, the cursor mid-turn
    state = first.state_dict()
    first.close()
    assert is_lane_position(state) and len(state["lanes"]) == 3
    # A fresh stream (built for another lane count, as a resumed run's would be) takes the saved one's.
    second = LaneStream(shards, _lane_maker(tokenizer, depth=depth), lanes=1)
    second.load_state_dict(json_position(state))
    assert second.lanes == 3
    tail, finished = _drain(second, SIZES[5:])
    assert head + tail == whole
    assert second.exhausted and finished
    with pytest.raises(DataError, match="different shard plan"):
        LaneStream(shards[:-1], _lane_maker(tokenizer), lanes=3).load_state_dict(state)


def test_a_shuffle_buffer_over_lanes_resumes_exactly(shards: list[Path], tokenizer: Any) -> None:
    def build() -> ShuffleStream:
        return ShuffleStream(LaneStream(shards, _lane_maker(tokenizer), lanes=2), size=5, seed=[1, 2])

    whole, finished_whole = _drain(build(), SIZES)
    first = build()
    head, finished_head = _drain(first, SIZES[:4])
    second = build()
    second.load_state_dict(first.state_dict())
    tail, finished_tail = _drain(second, SIZES[4:])
    assert head + tail == whole
    assert sorted(finished_head + finished_tail) == sorted(finished_whole) == sorted(map(str, shards))


# --------------------------------------------------------------------------- several ranks


def test_ranks_read_only_their_lanes_and_all_take_the_same_sequence(shards: list[Path], tokenizer: Any) -> None:
    expected = _by_hand(shards, tokenizer, 3)

    def rank(exchange: Any) -> tuple[list[list[int]], list[str], set[str], list[int], str | None]:
        stream = LaneStream(shards, _lane_maker(tokenizer, depth=1), lanes=3, exchange=exchange)
        assert stream.remaining_blocks_estimate() is not None
        blocks, finished = _drain(stream, SIZES)
        stream.at_end()
        summary = stream.reading_summary()
        stream.close()
        return blocks, finished, stream.read.shards, stream.owned, summary

    results = _on_ranks(2, rank)
    lanes = assign_lanes(shards, 3)
    for r, (blocks, finished, read, owned, summary) in enumerate(results):
        assert blocks == expected
        assert sorted(finished) == sorted(map(str, shards))
        assert owned == [lane for lane in range(3) if lane % 2 == r]
        assert read == {s for lane in owned for s in lanes[lane]}  # disjoint: only its own lanes' shards
        assert summary is not None and "rank 0: lanes 0,2" in summary and "rank 1: lane 1," in summary


def test_more_ranks_than_lanes_leaves_ranks_idle_with_a_warning(shards: list[Path], tokenizer: Any) -> None:
    expected = _by_hand(shards, tokenizer, 1)

    def rank(exchange: Any) -> tuple[list[list[int]], list[str], int]:
        stream = LaneStream(shards, _lane_maker(tokenizer), lanes=1, exchange=exchange)
        warnings: list[str] = []
        stream.warn = warnings.append
        blocks, _ = _drain(stream, SIZES)
        return blocks, warnings, len(stream.read.shards)

    (blocks0, warnings0, read0), (blocks1, warnings1, read1) = _on_ranks(2, rank)
    assert blocks0 == blocks1 == expected
    assert read0 == len(shards) and read1 == 0
    assert len(warnings0) == 1 and "rank 1 read no data" in warnings0[0]


def test_a_position_saved_by_two_ranks_continues_on_one(shards: list[Path], tokenizer: Any) -> None:
    whole = _by_hand(shards, tokenizer, 2)

    def rank(exchange: Any) -> tuple[list[list[int]], dict[str, Any]]:
        stream = LaneStream(shards, _lane_maker(tokenizer), lanes=2, exchange=exchange)
        head, _ = _drain(stream, SIZES[:5])
        return head, stream.state_dict()

    (head, state), (_, state1) = _on_ranks(2, rank)
    assert state == state1  # every rank holds every lane's position
    alone = LaneStream(shards, _lane_maker(tokenizer), lanes=1)
    alone.load_state_dict(state)
    tail, _ = _drain(alone, SIZES[5:])
    assert head + tail == whole
    # ... and one rank's position continues on three (two lanes: rank 2 idle).
    again = _on_ranks(3, lambda exchange: _continue(shards, tokenizer, state, exchange))
    assert all(blocks == tail for blocks in again)


def _continue(shards: list[Path], tokenizer: Any, state: dict[str, Any], exchange: Any) -> list[list[int]]:
    stream = LaneStream(shards, _lane_maker(tokenizer), lanes=3, exchange=exchange)
    stream.load_state_dict(state)
    return _drain(stream, SIZES[5:])[0]


# --------------------------------------------------------------------------- the planner's view


def test_planner_helpers_read_a_position_in_lanes(shards: list[Path], tokenizer: Any, tmp_path: Path) -> None:
    stream = LaneStream(shards, _lane_maker(tokenizer), lanes=3)
    stream.take(6)
    state = json_position(stream.state_dict())
    unread = position_unread_shards(state)
    per_lane = [position_unread_shards(lane) for lane in state["lanes"]]
    assert set(unread) == {s for lane in per_lane for s in lane} and len(unread) == len(set(unread))
    assert set(position_owned_shards(state)) >= set(unread)
    assert position_has_work(state)
    stream.take(10**6)
    done = json_position(stream.state_dict())
    assert position_unread_shards(done) == []
    # Read to the end, a lane's unit still holds the carry it flushed: work exactly when a plain one has it.
    assert position_has_work(done) == any(position_has_work(lane) for lane in done["lanes"])

    # The next increment: the unread shards stay in their lanes, new shards are dealt by bytes.
    new = [write_jsonl(tmp_path / "02-gamma" / f"n{i}.jsonl", make_documents("gamma", 4 + 4 * i, 50 + i))
           for i in range(3)]
    plan = [Path(s) for s in unread] + new
    rebased = rebase_position(state, plan)
    assert rebased["shards"] == [str(p) for p in plan] and len(rebased["lanes"]) == 3
    for lane, own in zip(rebased["lanes"], per_lane, strict=True):
        assert lane["shards"][: len(own)] == own
    assert sorted(s for lane in rebased["lanes"] for s in lane["shards"]) == sorted(map(str, plan))
    # The continuation reads what the first increment had left, then the new shards.
    continued = LaneStream(plan, _lane_maker(tokenizer), lanes=1)
    continued.load_state_dict(rebased)
    blocks, finished = _drain(continued, [10**6])
    assert blocks and set(map(str, new)) <= set(finished)
    assert continued.exhausted


def test_a_lane_that_fails_stops_every_rank_with_its_error(shards: list[Path], tokenizer: Any) -> None:
    lanes = assign_lanes(shards, 2)
    Path(lanes[1][0]).unlink()  # gone after planning: only rank 1, which reads lane 1, meets it

    def rank(exchange: Any) -> str:
        stream = LaneStream(shards, _lane_maker(tokenizer), lanes=2, exchange=exchange)
        with pytest.raises(DataError) as caught:
            _drain(stream, SIZES)
        return str(caught.value)

    messages = _on_ranks(2, rank)  # no rank is left waiting in the exchange
    assert messages[0] == messages[1] and Path(lanes[1][0]).name in messages[0]


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), (3, 3), ("2", 2)])
def test_the_lane_count_in_the_recipe(tmp_path: Path, value: Any, expected: Any) -> None:
    from conftest import tiny_recipe

    from olm_cli.recipe import recipe_from_dict

    assert recipe_from_dict(tiny_recipe(tmp_path, data={"lanes": value})).data.lanes == expected


@pytest.mark.parametrize("value", [0, -1, "many", True, 2.5])
def test_a_bad_lane_count_names_the_key(tmp_path: Path, value: Any) -> None:
    from conftest import tiny_recipe

    from olm_cli.errors import RecipeError
    from olm_cli.recipe import recipe_from_dict

    with pytest.raises(RecipeError, match=r"data\.lanes"):
        recipe_from_dict(tiny_recipe(tmp_path, data={"lanes": value}))


class _ListLane:
    """A lane of numbered one-token blocks (``lane * 1000 + i``), for checking the dealing alone."""

    warn = None

    def __init__(self, lane: int, length: int) -> None:
        self.lane, self.length, self.position = lane, length, 0

    @property
    def exhausted(self) -> bool:
        return self.position >= self.length

    def take(self, n: int) -> list[Any]:
        import numpy as np

        from olm_cli.samples import Block

        count = min(n, self.length - self.position)
        self.position += count
        return [Block(np.asarray([self.lane * 1000 + i], dtype=np.int32), f"lane{self.lane}", "d")
                for i in range(self.position - count, self.position)]

    def at_end(self) -> bool:
        return self.exhausted

    def take_finished_shards(self) -> list[str]:
        return []

    def long_document_counts(self, shard: str) -> dict[str, int]:
        return {"split": 0, "skipped": 0}

    def shard_problem(self, shard: str) -> str | None:
        return None

    def remaining_blocks_estimate(self) -> float:
        return float(self.length - self.position)

    def state_dict(self) -> dict[str, Any]:
        return {"shards": [f"lane{self.lane}"], "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])


@pytest.mark.parametrize("seed", range(6))
def test_dealing_is_the_round_robin_whatever_the_takes_and_the_world(seed: int) -> None:
    import random

    rng = random.Random(seed)
    k = rng.randint(2, 6)
    lengths = [rng.choice([0, 1, 2, 5, rng.randint(0, 40)]) for _ in range(k)]
    plan = [f"lane{lane}" for lane in range(k)]
    queues = [[lane * 1000 + i for i in range(length)] for lane, length in enumerate(lengths)]
    expected: list[int] = []
    while any(queues):
        expected += [queue.pop(0) for queue in queues if queue]
    sizes = [rng.randint(1, 9) for _ in range(60)]
    cut = rng.randint(1, len(sizes) - 1)

    def make(shards: list[Path], lanes: int) -> _ListLane:
        lane = int(str(shards[0])[len("lane"):])
        return _ListLane(lane, lengths[lane])

    def lanes_of(exchange: Any = None) -> LaneStream:
        stream = LaneStream(plan, make, lanes=k, exchange=exchange)
        # No file, no size: the shards are dealt by count, one to each lane in order.
        assert [stream.lane_shards(lane) for lane in range(k)] == [[name] for name in plan]
        return stream

    def run(exchange: Any) -> list[int]:
        first = lanes_of(exchange)
        head = [int(b.tokens[0]) for n in sizes[:cut] for b in first.take(n)]
        state = first.state_dict()
        second = lanes_of(exchange)
        second.load_state_dict(state)
        return head + [int(b.tokens[0]) for n in sizes[cut:] for b in second.take(n)]

    assert run(None) == expected
    world = rng.randint(2, 4)
    assert _on_ranks(world, run) == [expected] * world
