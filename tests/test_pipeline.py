"""The training stream's pipeline (olm_cli/pipeline.py): read-ahead and shuffle buffer.

Every test compares against the plain inline :class:`BlockStream` over the same shards: the
wrappers must not change which blocks are trained, when a shard counts as finished, or the
position a checkpoint stores.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import DOMAIN_PATTERN, make_documents, write_jsonl

from olm_cli.data import BlockStream
from olm_cli.errors import DataError
from olm_cli.pipeline import PrefetchStream, ShuffleStream, build_training_stream, json_position
from olm_cli.samples import Block


@pytest.fixture
def shards(tmp_path: Path) -> list[Path]:
    # Small shards of two domains (blocks cross shard boundaries within a domain) and a tiny one.
    paths = [write_jsonl(tmp_path / f"{i % 2:02d}-{'alpha' if i % 2 == 0 else 'beta'}" / f"s{i}.jsonl",
                         make_documents("alpha" if i % 2 == 0 else "beta", 3 + i % 4, i)) for i in range(8)]
    paths.append(write_jsonl(tmp_path / "00-alpha" / "tiny.jsonl", ["a b"]))
    return sorted(paths)


def _plain(shards: list[Path], tokenizer: Any, **options: Any) -> BlockStream:
    return BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, **options)


def _prefetch(shards: list[Path], tokenizer: Any, *, chunk: int = 3, depth: int = 2) -> PrefetchStream:
    return PrefetchStream(_plain(shards, tokenizer), replica=lambda: _plain(shards, tokenizer),
                          chunk_blocks=chunk, depth=depth)


def _drive(stream: Any, sizes: list[int]) -> list[tuple[list[list[int]], list[str], bool, float | None]]:
    """Take ``sizes`` blocks at a time; record the blocks, finished shards, exhausted and estimate.

    Finished shards are compared as a set per take: the ledger marks them in the same step, and
    the reader lists the shards that one call finishes in shard order, a block at a time in the
    order their last tokens went out.
    """
    trace = []
    for n in sizes:
        blocks = stream.take(n)
        trace.append(([b.tokens.tolist() for b in blocks], sorted(stream.take_finished_shards()), stream.exhausted,
                      stream.remaining_blocks_estimate()))
    return trace


SIZES = [1, 4, 2, 7, 3, 3, 5, 1, 500, 4]


def test_prefetch_gives_the_inline_stream_block_for_block(shards: list[Path], tokenizer: Any) -> None:
    inline = _drive(_plain(shards, tokenizer), SIZES)
    for chunk, depth in [(1, 1), (3, 2), (8, 4)]:
        stream = _prefetch(shards, tokenizer, chunk=chunk, depth=depth)
        assert _drive(stream, SIZES) == inline, (chunk, depth)
        stream.close()
    assert sum(len(t[1]) for t in inline) == len(shards)  # every shard finished, each once


def test_prefetch_state_is_the_inline_state_and_resumes(shards: list[Path], tokenizer: Any) -> None:
    reference = _plain(shards, tokenizer)
    stream = _prefetch(shards, tokenizer)
    for n in [2, 5, 1, 4]:
        reference.take(n)
        stream.take(n)
        reference.take_finished_shards()
        stream.take_finished_shards()
        assert stream.state_dict() == reference.state_dict()
    # Resume mid-read-ahead: a new prefetching stream from the saved position gives the rest.
    rest = _drive(reference, [3, 100])
    resumed = _prefetch(shards, tokenizer)
    resumed.load_state_dict(stream.state_dict())
    stream.close()
    assert _drive(resumed, [3, 100]) == rest
    resumed.close()


def test_prefetch_at_end_and_close_continue_inline(shards: list[Path], tokenizer: Any) -> None:
    reference, stream = _plain(shards, tokenizer), _prefetch(shards, tokenizer)
    for s in (reference, stream):
        s.take(6)
    assert stream.at_end() is reference.at_end() is False
    assert stream.take_finished_shards() == reference.take_finished_shards()
    assert stream.state_dict() == reference.state_dict()
    stream.close()
    assert stream._worker is None
    assert _drive(stream, [5, 10**6]) == _drive(reference, [5, 10**6])
    assert stream.at_end() is reference.at_end() is True


def test_a_reader_error_surfaces_where_the_data_is_consumed(tmp_path: Path, tokenizer: Any) -> None:
    good = write_jsonl(tmp_path / "00-alpha" / "a.jsonl", make_documents("alpha", 6, 1))
    bad = tmp_path / "00-alpha" / "b.jsonl"
    bad.write_text('{"text": "fine words here"}\n{not json\n', encoding="utf-8")
    inline = _plain([good, bad], tokenizer)
    before_error = 0
    with pytest.raises(DataError) as expected:
        while inline.take(1):
            before_error += 1
    stream = _prefetch([good, bad], tokenizer, chunk=2, depth=8)
    got = stream.take(before_error)  # everything before the bad record arrives first
    assert len(got) == before_error
    with pytest.raises(DataError) as raised:
        stream.take(1)
    assert str(raised.value) == str(expected.value) and "\n" not in str(raised.value)


def test_close_stops_a_worker_blocked_on_a_full_queue(shards: list[Path], tokenizer: Any) -> None:
    stream = _prefetch(shards, tokenizer, chunk=1, depth=1)
    stream.take(1)
    worker = stream._worker
    assert worker is not None
    deadline = time.monotonic() + 5
    while not worker.queue.full() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    stream.close()
    assert not worker.thread.is_alive() and time.monotonic() - started < 2
    assert not any(t.name == "olm-prefetch" and t is worker.thread for t in threading.enumerate())


def test_a_dropped_stream_lets_its_worker_go(shards: list[Path], tokenizer: Any) -> None:
    stream = _prefetch(shards, tokenizer, chunk=1, depth=1)
    stream.take(1)
    assert stream._worker is not None
    thread = stream._worker.thread
    del stream
    thread.join(5)
    assert not thread.is_alive()


def _shuffled(shards: list[Path], tokenizer: Any, size: int, *, prefetch: int = 0, seed: int = 3) -> ShuffleStream:
    return build_training_stream(_plain(shards, tokenizer), replica=lambda: _plain(shards, tokenizer), step_blocks=4,
                                 prefetch_steps=prefetch, shuffle_buffer=size, seed=[seed, 1])


def _ledger_check(stream: ShuffleStream, sizes: list[int]) -> list[Block]:
    """Drain ``stream``; every finished shard has had its last token handed out, none twice."""
    taken: list[Block] = []
    finished: list[str] = []
    for n in sizes + [10**6]:
        taken.extend(stream.take(n))
        for shard in stream.take_finished_shards():
            still = Counter(s for b in stream._buffer for s, _ in b.token_spans())
            assert still[shard] == 0, f"{shard} finished while blocks of it are buffered"
            finished.append(shard)
    assert stream.at_end() and stream.exhausted
    finished.extend(stream.take_finished_shards())
    assert len(finished) == len(set(finished))
    return taken


def test_shuffle_mixes_deterministically_and_loses_nothing(shards: list[Path], tokenizer: Any) -> None:
    inline = [b.tokens.tolist() for b in _plain(shards, tokenizer).take(10**6)]
    first = _ledger_check(_shuffled(shards, tokenizer, 8), SIZES)
    again = _ledger_check(_shuffled(shards, tokenizer, 8, prefetch=2), [5] * 40)  # take sizes do not matter
    other_seed = _ledger_check(_shuffled(shards, tokenizer, 8, seed=4), SIZES)
    tokens = [b.tokens.tolist() for b in first]
    assert tokens == [b.tokens.tolist() for b in again]
    assert tokens != inline and tokens != [b.tokens.tolist() for b in other_seed]
    assert sorted(map(tuple, tokens)) == sorted(map(tuple, inline))  # the buffer drains: every block once
    # Off (0) passes blocks through in order, with the plain stream's own state.
    off = _shuffled(shards, tokenizer, 0)
    assert [b.tokens.tolist() for b in off.take(10**6)] == inline
    assert "shuffle" not in off.state_dict()


def test_shuffle_ledger_counts_every_shard_once(shards: list[Path], tokenizer: Any) -> None:
    stream = _shuffled(shards, tokenizer, 32)
    _ledger_check(stream, [2, 2, 2])
    seen_all = _shuffled(shards, tokenizer, 32)
    finished = []
    while seen_all.take(3):
        finished += seen_all.take_finished_shards()
    seen_all.at_end()
    finished += seen_all.take_finished_shards()
    assert sorted(finished) == sorted(str(s) for s in shards)


def test_shuffle_resumes_bit_identically_through_a_saved_tree(shards: list[Path], tokenizer: Any,
                                                              tmp_path: Path) -> None:
    from olm_cli.state_files import load_tree, save_tree

    reference = _shuffled(shards, tokenizer, 8, prefetch=2)
    reference.take(5)
    reference.take_finished_shards()
    state = reference.state_dict()
    assert isinstance(state["shuffle"]["tokens"], np.ndarray) and state["shuffle"]["buffered"] == 7
    save_tree(tmp_path / "parts", {"stream": state})
    planner_view = json_position(state)
    assert planner_view["shuffle"]["tokens"] is None and planner_view["shards"] == state["shards"]
    rest = _drive(reference, [3, 4, 10**6])
    resumed = _shuffled(shards, tokenizer, 8, prefetch=2, seed=99)  # the saved generator wins over the seed
    resumed.load_state_dict(load_tree(tmp_path / "parts")["stream"])
    assert _drive(resumed, [3, 4, 10**6]) == rest
    # Turned off after a checkpoint with a full buffer: the buffered blocks are still trained.
    off = _shuffled(shards, tokenizer, 0)
    off.load_state_dict(state)
    assert sorted(map(tuple, (b.tokens.tolist() for b in off.take(10**6)))) == sorted(
        map(tuple, (blocks for step in rest for blocks in step[0])))
    for stream in (reference, resumed):
        stream.close()
