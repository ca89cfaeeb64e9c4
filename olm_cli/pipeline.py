"""The training stream's pipeline: read ahead in a thread, and mix blocks in a shuffle buffer.

Both are wrappers around the block-stream interface (:class:`BlockSource`, which
:class:`olm_cli.data.BlockStream` implements), so they work with any reader behind it:

* :class:`PrefetchStream` (``data.prefetch``) runs the reader in a daemon thread that reads,
  tokenises and packs a few steps ahead of the training step into a bounded queue, so the step
  does not wait for tokenisation. A thread, not a process: the tokenizers' Rust code releases
  the GIL while it encodes, so the work overlaps with the step without pickling the tokenizer
  (and its possibly remote-code class) into another process or copying the blocks back. The
  blocks come in exactly the inline order, finished shards are reported when the *step* has
  taken their last block, a reader error is raised when the step reaches the data it could not
  read, and :meth:`~PrefetchStream.state_dict` is the position of what the step consumed (the
  read-ahead is invisible to a checkpoint).
* :class:`ShuffleStream` (``data.shuffle_buffer``) keeps a buffer of blocks and hands out blocks
  drawn at random from it with its own seeded generator, so a batch mixes documents, shards and
  domains of the increment. A shard counts as finished only when none of its blocks is left in
  the buffer, and the buffer drains at the end of the data.

:class:`PrefetchStream`'s state is the reader's own (the position the step reached); a
:class:`ShuffleStream` adds a ``shuffle`` entry (the buffered blocks' tokens as one numpy
array, the held-back shards, the generator), so the engine keeps the stream position in the
checkpoint's ``parts`` (safetensors) and :func:`json_position` is the copy without arrays that
``trainer_state.json`` holds for the planner.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from olm_cli.samples import Block

# How long a stopped worker is waited for: it checks the stop flag between blocks, and a block
# costs at most one tokeniser chunk (data.DOCUMENT_CHUNK_CHARS), so this is only ever reached
# by a reader stuck in the operating system; the consumer never touches that reader again.
WORKER_JOIN_SECONDS = 10.0
_POLL_SECONDS = 0.1


class BlockSource(Protocol):
    """What the engine reads training blocks from (see :class:`olm_cli.data.BlockStream`)."""

    warn: Callable[[str], None] | None

    @property
    def exhausted(self) -> bool: ...

    def take(self, n: int) -> list[Block]: ...

    def at_end(self) -> bool: ...

    def take_finished_shards(self) -> list[str]: ...

    def long_document_counts(self, shard: str) -> dict[str, int]: ...

    def shard_problem(self, shard: str) -> str | None: ...

    def remaining_blocks_estimate(self) -> float | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --------------------------------------------------------------------------- read-ahead


@dataclass
class _Entry:
    """One step of the worker's reader: a block (``None`` at the end) and what finished around it.

    ``finished_before`` are the shards the reader reported while reading up to this block (what
    ``at_end()`` would report), ``finished_with`` those whose last token is in this block.
    ``shard_facts`` holds their long-document counts and bad-record reasons, and the estimates
    are the reader's ``remaining_blocks_estimate()`` before and after the block: all taken in
    the worker, where the reader lives, so the consumer answers as the inline reader would.
    """

    block: Block | None
    finished_before: list[str]
    finished_with: list[str]
    exhausted: bool
    estimate_before: float | None
    estimate_after: float | None
    shard_facts: dict[str, tuple[dict[str, int], str | None]] = field(default_factory=dict)


@dataclass
class _Chunk:
    """Consecutive entries and the reader's state *before* the first of them."""

    start_state: dict[str, Any]
    entries: list[_Entry]


@dataclass
class _Failure:
    """The reader raised: re-raised in the consumer when it reaches this point of the data."""

    error: BaseException


class _Worker:
    """The thread that drives the reader and fills the queue, a chunk at a time."""

    def __init__(self, reader: BlockSource, *, chunk_blocks: int, depth: int) -> None:
        self.reader = reader
        self.chunk_blocks = chunk_blocks
        self.queue: queue.Queue[_Chunk | _Failure] = queue.Queue(maxsize=depth)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="olm-prefetch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            state = self.reader.state_dict()
        except Exception as exc:
            self._put(_Failure(exc))
            return
        while not self.stop_event.is_set():
            entries: list[_Entry] = []
            failure: _Failure | None = None
            try:
                while len(entries) < self.chunk_blocks and not self.stop_event.is_set():
                    entries.append(self._next_entry())
                    if entries[-1].block is None:
                        break
                if entries and entries[-1].block is not None:
                    next_state = self.reader.state_dict()
            except Exception as exc:  # a DataError for a bad file, or a bug: either way the step must see it
                failure = _Failure(exc)
            # The blocks read before a failure still come first, as they would inline.
            if entries and not self._put(_Chunk(state, entries)):
                return
            if failure is not None:
                self._put(failure)
                return
            if not entries or entries[-1].block is None:
                return
            state = next_state

    def _next_entry(self) -> _Entry:
        reader = self.reader
        ended = reader.at_end()
        before = reader.take_finished_shards()
        estimate_before = reader.remaining_blocks_estimate()
        block = None if ended else reader.take(1)[0]
        with_block = [] if ended else reader.take_finished_shards()
        estimate_after = estimate_before if ended else reader.remaining_blocks_estimate()
        facts = {shard: (reader.long_document_counts(shard), reader.shard_problem(shard)) for shard in before + with_block}
        return _Entry(block, before, with_block, reader.exhausted, estimate_before, estimate_after, facts)

    def _put(self, item: _Chunk | _Failure) -> bool:
        while not self.stop_event.is_set():
            try:
                self.queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> _Chunk | _Failure:
        return self.queue.get()

    def stop(self) -> None:
        self.stop_event.set()
        while True:  # free a put that is waiting for room
            try:
                self.queue.get_nowait()
            except queue.Empty:
                break
        self.thread.join(WORKER_JOIN_SECONDS)


class PrefetchStream:
    """Reads ahead of the step in a worker thread; to the engine it is the inline stream.

    ``replica`` builds a fresh reader with the same settings. The consumer's position is "the
    state before the chunk it is in, plus ``taken`` blocks": :meth:`state_dict` replays that
    many blocks on a replica (at most one chunk, a step's worth, re-tokenised per checkpoint)
    and returns the replica's state, which is exactly the inline stream's state at this point,
    whatever the reader's state format. With ``depth`` 0 there is no thread and every call
    goes straight to the reader.

    :meth:`close` stops the worker; the stream then continues inline from the consumer's
    position (the end of an increment still reads ahead one block to close the last shard).
    """

    def __init__(self, reader: BlockSource, *, replica: Callable[[], BlockSource], chunk_blocks: int,
                 depth: int) -> None:
        if chunk_blocks < 1:
            raise ValueError(f"chunk_blocks must be at least 1, got {chunk_blocks}")
        self.reader = reader
        self.replica = replica
        self.chunk_blocks = chunk_blocks
        self.depth = depth
        self._worker: _Worker | None = None
        self._closed = depth == 0
        self._start_position(reader.state_dict() if depth else {}, exhausted=reader.exhausted)

    def _start_position(self, state: dict[str, Any], *, exhausted: bool) -> None:
        """Consumer bookkeeping at a position the reader holds (nothing read ahead yet)."""
        self._chunk = _Chunk(state, [])
        self._taken = 0  # entries of the chunk the consumer is past
        self._peeked = False  # at_end() read up to the next block since the last take
        self._exhausted = exhausted
        self._estimate: float | None = None  # the reader's estimate at the consumer's position
        self._finished: list[str] = []
        self._facts: dict[str, tuple[dict[str, int], str | None]] = {}

    # -- the stream interface ---------------------------------------------------------------

    @property
    def warn(self) -> Callable[[str], None] | None:
        return self.reader.warn

    @warn.setter
    def warn(self, value: Callable[[str], None] | None) -> None:
        self.reader.warn = value  # warnings come from the worker, as it reads

    @property
    def exhausted(self) -> bool:
        return self.reader.exhausted if self._closed else self._exhausted

    def take(self, n: int) -> list[Block]:
        if self._closed:
            return self.reader.take(n)
        out: list[Block] = []
        while len(out) < n:
            entry = self._next_entry()
            if not self._peeked:
                self._report(entry.finished_before, entry)
            if entry.block is None:  # the end: stay on it, so later calls also see it
                self._peeked, self._exhausted, self._estimate = True, True, entry.estimate_before
                break
            self._report(entry.finished_with, entry)
            out.append(entry.block)
            self._exhausted, self._estimate = entry.exhausted, entry.estimate_after
            self._taken += 1
            self._peeked = False
        return out

    def at_end(self) -> bool:
        if self._closed:
            return self.reader.at_end()
        entry = self._next_entry()
        if not self._peeked:
            self._report(entry.finished_before, entry)
        self._peeked = True
        self._estimate = entry.estimate_before
        self._exhausted = entry.block is None
        return self._exhausted

    def take_finished_shards(self) -> list[str]:
        finished, self._finished = self._finished, []
        return finished + (self.reader.take_finished_shards() if self._closed else [])

    def long_document_counts(self, shard: str) -> dict[str, int]:
        facts = self._facts.get(shard)
        return dict(facts[0]) if facts is not None else self.reader.long_document_counts(shard)

    def shard_problem(self, shard: str) -> str | None:
        facts = self._facts.get(shard)
        return facts[1] if facts is not None else self.reader.shard_problem(shard)

    def remaining_blocks_estimate(self) -> float | None:
        if self._reading_inline():
            return self.reader.remaining_blocks_estimate()
        return self._estimate  # set by the first take() or at_end(), which started the worker

    def state_dict(self) -> dict[str, Any]:
        if self._reading_inline():  # nothing read ahead: the reader is where the consumer is
            return self.reader.state_dict()
        return self._replay_position().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._stop_worker()
        self.reader.load_state_dict(state)
        if not self._closed:
            self._start_position(state, exhausted=self.reader.exhausted)

    def close(self) -> None:
        """Stop reading ahead; continue inline from where the consumer is."""
        if self._closed:
            return
        if self._worker is not None:
            warn = self.reader.warn
            position = self._replay_position()  # before stopping: the worker's reader is abandoned
            self._stop_worker()
            position.warn = warn
            self.reader = position
        self._closed = True

    # -- the consumer -----------------------------------------------------------------------

    def _next_entry(self) -> _Entry:
        """The entry after the last one taken, waiting for the worker if it is not read yet."""
        while self._taken >= len(self._chunk.entries):
            if self._chunk.entries and self._chunk.entries[-1].block is None:
                return self._chunk.entries[-1]
            item = self._ensure_worker().get()
            if isinstance(item, _Failure):
                self._stop_worker()
                self._closed = True  # the reader is in an unknown state; the error ends the increment
                raise item.error
            self._chunk, self._taken = item, 0
        return self._chunk.entries[self._taken]

    def _reading_inline(self) -> bool:
        """No read-ahead in flight: the reader is exactly where the consumer is."""
        return self._closed or self._worker is None

    def _report(self, shards: list[str], entry: _Entry) -> None:
        self._finished.extend(shards)
        for shard in shards:
            self._facts[shard] = entry.shard_facts[shard]

    def _ensure_worker(self) -> _Worker:
        if self._worker is None:
            self._worker = _Worker(self.reader, chunk_blocks=self.chunk_blocks, depth=self.depth)
            # A stream dropped without close() must not leave its thread waiting on a full queue.
            weakref.finalize(self, self._worker.stop_event.set)
            self._worker.start()
        return self._worker

    def _stop_worker(self) -> None:
        if self._worker is not None:
            self._worker.stop()
            self._worker = None

    def _replay_position(self) -> BlockSource:
        """A fresh reader at the consumer's position: the chunk's start state plus what was taken."""
        reader = self.replica()
        reader.warn = None  # these blocks were read (and warned about) once already
        reader.load_state_dict(self._chunk.start_state)
        if self._taken:
            reader.take(self._taken)
        if self._peeked:
            reader.at_end()
        reader.take_finished_shards()
        return reader


# --------------------------------------------------------------------------- shuffle buffer


class ShuffleStream:
    """Hands out blocks drawn at random from a buffer of ``size`` blocks, refilled from ``inner``.

    Before every draw the buffer is topped up to ``size`` blocks (while ``inner`` has any), so
    the blocks a run sees do not depend on how many a step takes. The generator is seeded from
    ``seed`` (the run's seed and the increment) and checkpointed with the buffer. ``size`` 0 or 1
    passes blocks through in order; it still drains a buffer loaded from a checkpoint written
    with a larger one, so turning the option off loses nothing.

    The state is the inner stream's, plus a ``shuffle`` entry with the buffered blocks (tokens
    as one numpy array), the shards held back and the generator's state.
    """

    def __init__(self, inner: BlockSource, *, size: int, seed: list[int]) -> None:
        self.inner = inner
        self.size = max(1, size)
        self.rng = np.random.default_rng(seed)
        self._buffer: list[Block] = []
        self._buffered_shards: Counter[str] = Counter()
        self._held: list[str] = []  # finished by inner, but tokens of theirs are still buffered
        self._finished: list[str] = []

    @property
    def warn(self) -> Callable[[str], None] | None:
        return self.inner.warn

    @warn.setter
    def warn(self, value: Callable[[str], None] | None) -> None:
        self.inner.warn = value

    @property
    def exhausted(self) -> bool:
        return not self._buffer and self.inner.exhausted

    def take(self, n: int) -> list[Block]:
        if n <= 0:
            return []
        if self.size == 1 and not self._buffer:
            return self._pass_through(n)
        incoming = deque(self.inner.take(max(0, self.size - len(self._buffer) + n - 1)))  # what the top-ups below move
        self._held.extend(self.inner.take_finished_shards())
        out: list[Block] = []
        for _ in range(n):
            while len(self._buffer) < self.size and incoming:
                self._add(incoming.popleft())
            if not self._buffer:
                break
            out.append(self._draw())
        assert not incoming, "every block taken from the inner stream is buffered"
        self._release_finished()
        return out

    def _pass_through(self, n: int) -> list[Block]:
        blocks = self.inner.take(n)
        self._finished.extend(self.inner.take_finished_shards())
        return blocks

    def at_end(self) -> bool:
        if self._buffer:
            return False
        ended = self.inner.at_end()
        self._finished.extend(self.inner.take_finished_shards())
        return ended

    def take_finished_shards(self) -> list[str]:
        finished, self._finished = self._finished, []
        return finished

    def long_document_counts(self, shard: str) -> dict[str, int]:
        return self.inner.long_document_counts(shard)

    def shard_problem(self, shard: str) -> str | None:
        return self.inner.shard_problem(shard)

    def remaining_blocks_estimate(self) -> float | None:
        estimate = self.inner.remaining_blocks_estimate()
        return None if estimate is None else estimate + len(self._buffer)

    def close(self) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()

    def _add(self, block: Block) -> None:
        self._buffer.append(block)
        self._buffered_shards.update(shard for shard, _ in block.token_spans())

    def _draw(self) -> Block:
        buffer = self._buffer
        index = int(self.rng.integers(len(buffer))) if len(buffer) > 1 else 0
        buffer[index], buffer[-1] = buffer[-1], buffer[index]
        block = buffer.pop()
        self._buffered_shards.subtract(shard for shard, _ in block.token_spans())
        return block

    def _release_finished(self) -> None:
        """Shards the inner stream finished are finished here once none of their tokens is buffered."""
        done = [shard for shard in self._held if self._buffered_shards[shard] <= 0]
        self._held = [shard for shard in self._held if shard not in done]
        self._finished.extend(done)

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        state = self.inner.state_dict()
        if self.size == 1 and not self._buffer:
            return state  # passing through: exactly the inner stream's position
        blocks = self._buffer
        return {**state, "shuffle": {
            "tokens": np.concatenate([b.tokens for b in blocks]) if blocks else np.zeros(0, dtype=np.int32),
            "lengths": np.asarray([len(b) for b in blocks], dtype=np.int64),
            "domains": [b.domain for b in blocks],
            "spans": [[list(span) for span in b.token_spans()] for b in blocks],
            "held": list(self._held),
            "buffered": len(blocks),
            "rng": self.rng.bit_generator.state,
        }}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`; a plain stream's state starts with an empty buffer."""
        meta = state.get("shuffle")
        self.inner.load_state_dict({key: value for key, value in state.items() if key != "shuffle"})
        self._buffer, self._buffered_shards, self._finished = [], Counter(), []
        self._held = list(meta["held"]) if meta else []
        if not meta:
            return
        tokens = np.asarray(meta["tokens"], dtype=np.int32)
        starts = np.concatenate([[0], np.cumsum(np.asarray(meta["lengths"], dtype=np.int64))])
        for i, (domain, spans) in enumerate(zip(meta["domains"], meta["spans"], strict=True)):
            token_spans = tuple((str(shard), int(count)) for shard, count in spans)
            self._add(Block(tokens[starts[i] : starts[i + 1]].copy(), token_spans[0][0], domain, token_spans))
        self.rng.bit_generator.state = meta["rng"]


# --------------------------------------------------------------------------- assembly


def build_training_stream(reader: BlockSource, *, replica: Callable[[], BlockSource], step_blocks: int,
                          prefetch_steps: int, shuffle_buffer: int, seed: list[int]) -> ShuffleStream:
    """One reader's training stream: ``reader``, read ahead ``prefetch_steps`` steps, then shuffled.

    The engine puts :class:`olm_cli.data.lanes.LaneStream` between the two (one read-ahead
    per lane); with one lane and one process that is this stream, block for block.

    The shuffle buffer sits on top, in the consumer's thread (a draw is cheap); the worker does
    the reading and tokenising underneath it. It is there even when off (``shuffle_buffer`` 0,
    passing blocks through), so a buffer saved by an earlier run with it on is still trained.
    """
    ahead = PrefetchStream(reader, replica=replica, chunk_blocks=max(1, step_blocks), depth=prefetch_steps)
    return ShuffleStream(ahead, size=shuffle_buffer, seed=seed)


def buffered_shards(state: dict[str, Any]) -> set[str]:
    """Shards with tokens in a saved position's shuffle buffer (its JSON copy is enough).

    A step budget can end an increment with blocks of shards the reader has finished still in
    the buffer; those shards are no longer in the position's shard plan, but they are the
    stream's business until their blocks are trained: the planner must not plan them afresh.
    """
    meta = state.get("shuffle") or {}
    return set(meta.get("held", [])) | {str(span[0]) for spans in meta.get("spans", []) for span in spans}


def json_position(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` without its numpy arrays, for ``trainer_state.json``.

    The full state (with the shuffle buffer's tokens) is saved in the checkpoint's ``parts``;
    the JSON copy is what the torch-free planner reads (shards, how far, whether blocks are
    pending), so an array becomes ``None`` and lists keep their length.
    """
    def strip(node: Any) -> Any:
        if isinstance(node, np.ndarray):
            return None
        if isinstance(node, dict):
            return {key: strip(value) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return [strip(value) for value in node]
        return node

    return strip(state)
