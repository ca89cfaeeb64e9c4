"""The block stream: planned shards in, packed token blocks out, resumable at every block.

Reading goes through :mod:`olm_cli.data.reader` (plain buffered reads for local shards,
``datasets`` only for ``data.dataset`` sources); documents are tokenised in batches (one fast
tokenizer call per ``batch_documents`` documents or ``batch_chars`` characters, tokens identical
to per-document calls); :mod:`olm_cli.data.packing` joins them with EOS into blocks that may cross
shard boundaries within a domain. Texts longer than ``chunk_chars`` are tokenised a chunk per
refill, so a 50 MB record costs the same per token as small ones and never blocks a stop
request; a document over ``max_document_tokens`` is split into pieces or skipped with a warning.

The contract a wrapper (a prefetch worker, a shuffle buffer) can rely on:

* ``take(n) -> list[Block]``: up to ``n`` blocks, fewer only when the data is exhausted.
* ``exhausted``: nothing is left (every shard read, no block pending, the carry flushed).
* ``at_end()``: like ``exhausted`` but reads ahead to find out (a step budget can end exactly on
  the last block before the reader saw the end of the file).
* ``take_finished_shards()``: shards whose *last token* is in a block handed out since the
  previous call (a shard whose tail waits in the carry is not finished until that block is
  taken, or until the end of the data flushes or drops the carry); ``shard_problem(shard)`` is
  the bad-record reason for a shard cut short (``bad_records="quarantine"``), else ``None``.
* ``state_dict()`` / ``load_state_dict()``: a small JSON object (no token lists of documents):
  the *unit* being read (the reader position, the carry and counters when the last refill
  began) and how many of its blocks were handed out. A resume re-reads that unit (at most one
  tokenizer batch or one long-document chunk) and drops what was handed out, so it continues
  bit-identically at every block boundary. Positions written by olm 0.2 (``datasets`` iterator
  states, pending blocks) still load: the reader skips the records they had consumed.
* ``remaining_blocks_estimate()``: blocks still to come, exact once every shard has been read,
  estimated from the shards' bytes and the tokens per byte read so far before that (``None``
  for a ``datasets`` source, which has no size).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from olm_cli.data.packing import DOCUMENT_CHUNK_CHARS, Packer, chunk_end
from olm_cli.data.reader import BadRecord, RecordReader, open_reader
from olm_cli.data.shards import (
    DATASET_PREFIX,
    domain_of,
    is_dataset_source,
    require_regular_file,
    shard_format,
    validate_shard,
)
from olm_cli.errors import DataError
from olm_cli.samples import Block

logger = logging.getLogger(__name__)

LONG_DOCUMENT_POLICIES = ("split", "skip")
BAD_RECORD_POLICIES = ("raise", "quarantine")
STREAM_FORMAT = 2
# A position split into lanes (olm_cli/data/lanes.py): one BlockStream position per lane.
LANES_FORMAT = "lanes/1"


@dataclass
class _Document:
    """A long record being tokenised, a chunk per refill.

    ``start`` is the reader position *before* the record: a checkpoint taken in the middle of
    it stores that with ``offset`` (characters done) instead of the rest of the text, and a
    resume reads the record again and continues at ``offset``.
    """

    text: str
    domain: str
    shard: str
    record: int  # 1-based record number inside the shard, for messages
    start: dict[str, Any]
    offset: int = 0
    piece_tokens: int = 0  # tokens of the current piece already packed
    pieces: int = 1

    def position(self) -> dict[str, Any]:
        return {"start": self.start, "record": self.record, "offset": self.offset,
                "piece_tokens": self.piece_tokens, "pieces": self.pieces}


def shard_bytes(path: Path) -> int:
    """The size the reader's ``bytes_done`` runs up to: the file size, or for .gz the
    decompressed size from the gzip trailer (modulo 4 GiB, as gzip stores it)."""
    if is_dataset_source(path):
        return 0
    try:
        size = os.path.getsize(path)
        if str(path).lower().endswith(".gz") and size >= 18:
            with open(path, "rb") as handle:
                handle.seek(-4, os.SEEK_END)
                return int(struct.unpack("<I", handle.read(4))[0])
        return size
    except OSError:
        return 0


def assign_lanes(shards: Sequence[Path | str], lanes: int, loads: Sequence[int] | None = None) -> list[list[str]]:
    """Split an increment's shards into ``lanes`` lanes of about equal bytes (olm_cli/data/lanes.py).

    Greedy, largest shard first (ties in plan order), each to the lane holding the fewest bytes,
    then the fewest shards, then the lowest index; ``loads`` are bytes a lane holds already (a
    carried lane's unread shards). A lane keeps its shards in plan order. Only file sizes and
    the plan decide, never the world size, so every rank and every later run computes the same
    split. A ``datasets`` source has no size: it is one shard, placed by the shard count.
    """
    if lanes < 1:
        raise ValueError(f"lanes must be at least 1, got {lanes}")
    names = [str(s) for s in shards]
    sizes = [shard_bytes(Path(name)) for name in names]
    totals = list(loads) if loads is not None else [0] * lanes
    counts = [0] * lanes
    chosen: list[list[int]] = [[] for _ in range(lanes)]
    for index in sorted(range(len(names)), key=lambda i: (-sizes[i], i)):
        lane = min(range(lanes), key=lambda lane: (totals[lane], counts[lane], lane))
        chosen[lane].append(index)
        totals[lane] += sizes[index]
        counts[lane] += 1
    return [[names[i] for i in sorted(indices)] for indices in chosen]


class BlockStream:
    """Streams token blocks from an ordered list of shards (see the module docstring for the contract).

    ``bad_records``: ``"raise"`` stops with a :class:`DataError` at a bad record (evaluation
    sets, replay seed files); ``"quarantine"`` (the training stream) ends that shard there, warns,
    and reports the reason through :meth:`shard_problem`; the records before it stay trained.
    """

    def __init__(
        self,
        shards: Sequence[Path],
        tokenizer: Any,
        *,
        block_size: int,
        fmt: str = "auto",
        text_field: str = "text",
        domain_from: str = "path",
        domain_pattern: str = r"(?P<domain>[^/]+)/[^/]+$",
        domain_field: str = "domain",
        min_block_tokens: int = 8,
        max_document_tokens: int = 1_000_000,
        long_documents: str = "split",
        warn: Callable[[str], None] | None = logger.warning,
        chunk_chars: int = DOCUMENT_CHUNK_CHARS,
        bad_records: str = "raise",
        batch_documents: int = 64,
        batch_chars: int = 1 << 20,
    ) -> None:
        if max_document_tokens < 1:
            raise ValueError(f"max_document_tokens must be at least 1, got {max_document_tokens}")
        if long_documents not in LONG_DOCUMENT_POLICIES:
            raise ValueError(f"long_documents must be one of {LONG_DOCUMENT_POLICIES}, got {long_documents!r}")
        if bad_records not in BAD_RECORD_POLICIES:
            raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {bad_records!r}")
        self.shards = [Path(s) for s in shards]
        self._names = [str(s) for s in self.shards]
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.fmt = fmt
        self.text_field = text_field
        self.domain_from = domain_from
        self.domain_pattern = domain_pattern
        self.domain_field = domain_field
        self.min_block_tokens = min_block_tokens
        self.max_document_tokens = max_document_tokens
        self.long_documents = long_documents
        self.warn = warn
        self.chunk_chars = chunk_chars
        self.bad_records = bad_records
        self.batch_documents = batch_documents
        self.batch_chars = batch_chars
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token; packing needs one to separate documents")
        self._eos = int(eos)
        self._packer = Packer(block_size, self._eos)
        self._path_domains: dict[str, str] = {}
        self._sizes: list[int] | None = None
        # Position: the shard being read and its reader, a long document in progress, blocks
        # cut but not handed out, and the unit snapshot a checkpoint stores.
        self._shard_index = 0
        self._reader: RecordReader | None = None
        self._document: _Document | None = None
        self._pending: list[Block] = []
        self._unit: dict[str, Any] | None = None
        self._handed_out = 0
        # Shards read to their end (or to a bad record) whose last tokens may still be in the
        # carry or pending; then finished, until take_finished_shards().
        self._closed: list[str] = []
        self._finished: list[str] = []
        # shard -> {"split": n, "skipped": n}: long documents met so far; shard -> bad-record reason.
        self._long_documents: dict[str, dict[str, int]] = {}
        self._problems: dict[str, str] = {}
        # For the schedule estimate: tokens packed and shard bytes read by this stream.
        self._tokens_read = 0
        self._bytes_read = 0

    # -- the contract ------------------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        return (self._shard_index >= len(self.shards) and not self._pending and self._document is None
                and not self._packer.tokens_held())

    def at_end(self) -> bool:
        """True when no block is left; reads ahead (into pending blocks) to find out."""
        if self._pending:
            return False
        return not self._refill()

    def take(self, n: int) -> list[Block]:
        """Up to ``n`` blocks (fewer only when every shard is exhausted)."""
        out: list[Block] = []
        while len(out) < n:
            if not self._pending and not self._refill():
                break
            chunk = self._pending[: n - len(out)]
            del self._pending[: len(chunk)]
            self._handed_out += len(chunk)
            out.extend(chunk)
        self._note_finished()
        return out

    def take_finished_shards(self) -> list[str]:
        """Shards whose last token has been handed out (or dropped) since the previous call."""
        finished, self._finished = self._finished, []
        return finished

    def long_document_counts(self, shard: str) -> dict[str, int]:
        """``{"split": n, "skipped": n}``: documents of ``shard`` over ``max_document_tokens``."""
        return dict(self._long_documents.get(shard, {"split": 0, "skipped": 0}))

    def shard_problem(self, shard: str) -> str | None:
        """Why ``shard`` was cut short (its first bad record), or ``None`` if it was read to its end."""
        return self._problems.get(shard)

    def remaining_blocks_estimate(self) -> float | None:
        """Blocks still to come: exact once every shard is read, else estimated from bytes."""
        if any(is_dataset_source(p) for p in self.shards):
            return None
        if not self._tokens_read and not self.exhausted:
            self.at_end()  # read one unit: the tokens per byte come from this data, not a guess
        carry = self._packer.tokens_held()
        unread = self._unread_bytes()
        if unread == 0 and self._document is None:
            flushed = sum(len(c.tokens) >= self.min_block_tokens for c in self._packer.carry.values())
            return float(len(self._pending) + flushed)
        per_byte = self._tokens_read / max(1, self._bytes_read + self._reader_bytes())
        if self._document is not None:
            unread += len(self._document.text) - self._document.offset
        return len(self._pending) + (carry + unread * per_byte) / self.block_size

    # -- reading -----------------------------------------------------------------------------

    def _refill(self) -> bool:
        """Read until at least one block is pending; False when all shards are done.

        Each pass is one *unit* (a tokenizer batch, or one chunk of a long document) and starts
        with a snapshot of the position, so the caller gets its blocks (and the engine a chance
        to see a stop request) after a bounded amount of work, and a resume replays one unit.
        """
        while not self._pending:
            self._unit = self._snapshot()
            self._handed_out = 0
            if self._document is not None:
                self._feed_document()
                continue
            batch = self._read_batch()
            if batch:
                self._pack_batch(batch)
            elif self._document is None and self._shard_index >= len(self.shards):
                self._pending.extend(self._packer.flush(self.min_block_tokens))
                if not self._pending:
                    self._note_finished()
                    return False
        return True

    def _read_batch(self) -> list[tuple[str, str, str, int]]:
        """Up to ``batch_documents`` documents (or ``batch_chars``), across shard boundaries.

        Stops early at a long document, which becomes the document in progress after this batch.
        """
        batch: list[tuple[str, str, str, int]] = []
        chars = 0
        while len(batch) < self.batch_documents and chars < self.batch_chars and self._shard_index < len(self.shards):
            reader = self._reader if self._reader is not None else self._open_current()
            shard = self._names[self._shard_index]
            try:
                record = reader.read()
            except BadRecord as exc:
                self._bad_record(shard, str(exc))
                continue
            if record is None:
                self._close_shard()
                continue
            text, domain = record
            if not text:
                continue
            domain = domain if domain is not None else self._path_domain(shard)
            if len(text) > self.chunk_chars:
                self._document = _Document(text, domain, shard, reader.records, reader.record_start())
                break
            batch.append((text, shard, domain, reader.records))
            chars += len(text)
        return batch

    def _pack_batch(self, batch: list[tuple[str, str, str, int]]) -> None:
        # verbose=False: documents are longer than the model's context by design (they are packed).
        encoded = self.tokenizer([text for text, _, _, _ in batch], add_special_tokens=False, verbose=False)["input_ids"]
        cap = self.max_document_tokens
        for (text, shard, domain, record), ids in zip(batch, encoded, strict=True):
            if len(ids) <= cap:
                self._pack(shard, domain, ids, end_of_document=True)
                continue
            document = _Document(text, domain, shard, record, {}, offset=len(text))
            if self.long_documents == "skip":
                self._count_long(document, "skipped", "skipped (data.long_documents: skip)")
                continue
            self._count_long(document, "split", "split into pieces of at most that many tokens")
            for start in range(0, len(ids), cap):
                self._pack(shard, domain, ids[start : start + cap], end_of_document=True)

    def _open_current(self) -> RecordReader:
        path = self.shards[self._shard_index]
        if not is_dataset_source(path):
            require_regular_file(path)
        domain_field = self.domain_field if self.domain_from == "field" else None
        try:
            self._reader = open_reader(path, shard_format(path, self.fmt), self.text_field, domain_field)
        except BadRecord as exc:  # a parquet file whose footer went bad after planning
            self._reader = _EmptyReader(path)
            self._bad_record(self._names[self._shard_index], str(exc))
        except OSError as exc:
            raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
        return self._reader

    def _bad_record(self, shard: str, reason: str) -> None:
        if self.bad_records == "raise" or is_dataset_source(shard):
            raise DataError(reason)
        self._problems[shard] = reason
        assert self._reader is not None
        if self.warn is not None:
            self.warn(f"{reason}; the rest of the shard is quarantined (the {self._reader.records:,} records "
                      "before it are trained)")
        self._close_shard()

    def _close_shard(self) -> None:
        if self._reader is not None:
            self._bytes_read += self._reader.bytes_done()
            self._reader.close()
        self._reader = None
        self._closed.append(self._names[self._shard_index])
        self._shard_index += 1

    def _reader_bytes(self) -> int:
        return self._reader.bytes_done() if self._reader is not None else 0

    def _unread_bytes(self) -> int:
        if self._sizes is None:
            self._sizes = [shard_bytes(p) for p in self.shards]
        rest = sum(self._sizes[self._shard_index :])
        return max(0, rest - self._reader_bytes())

    def _note_finished(self) -> None:
        """Move closed shards none of whose tokens are still held (carry, pending) to finished."""
        if not self._closed:
            return
        held = self._packer.shards_held()
        for block in self._pending:
            held.update(shard for shard, _ in block.token_spans())
        if self._document is not None:
            held.add(self._document.shard)
        still = [shard for shard in self._closed if shard in held]
        self._finished.extend(shard for shard in self._closed if shard not in held)
        self._closed = still

    # -- long documents ----------------------------------------------------------------------

    def _tokenize_chunk(self, document: _Document) -> list[int]:
        end = chunk_end(document.text, document.offset, self.chunk_chars)
        ids = self.tokenizer(document.text[document.offset : end], add_special_tokens=False, verbose=False)["input_ids"]
        document.offset = end
        return list(ids)

    def _feed_document(self) -> None:
        """Tokenise the next chunk of the current long document and pack it."""
        document = self._document
        assert document is not None
        if self.long_documents == "skip":
            self._feed_whole_or_skip(document)
            return
        ids = self._tokenize_chunk(document)
        done = document.offset >= len(document.text)
        cap = self.max_document_tokens
        start = 0
        while len(ids) - start > cap - document.piece_tokens:
            # This piece is full and more tokens follow: close it like a document.
            room = cap - document.piece_tokens
            self._pack(document.shard, document.domain, ids[start : start + room], end_of_document=True)
            start += room
            document.piece_tokens = 0
            document.pieces += 1
            if document.pieces == 2:
                self._count_long(document, "split", "split into pieces of at most that many tokens")
        document.piece_tokens += len(ids) - start
        self._pack(document.shard, document.domain, ids[start:], end_of_document=done)
        if done:
            self._document = None

    def _feed_whole_or_skip(self, document: _Document) -> None:
        """Skip policy: tokenise up to the cap; pack the document only if it fits.

        At most ``max_document_tokens`` tokens (plus one chunk) are tokenised, in this one call,
        so a skipped document is never half-packed and never needs a mid-document position.
        """
        ids: list[int] = []
        while document.offset < len(document.text) and len(ids) <= self.max_document_tokens:
            ids.extend(self._tokenize_chunk(document))
        self._document = None
        if len(ids) > self.max_document_tokens:
            self._count_long(document, "skipped", "skipped (data.long_documents: skip)")
            return
        self._pack(document.shard, document.domain, ids, end_of_document=True)

    def _pack(self, shard: str, domain: str, ids: Sequence[int], *, end_of_document: bool) -> None:
        self._tokens_read += len(ids) + int(end_of_document)
        self._pending.extend(self._packer.push(domain, ids, shard=shard, end_of_document=end_of_document))

    def _count_long(self, document: _Document, outcome: str, action: str) -> None:
        counts = self._long_documents.setdefault(document.shard, {"split": 0, "skipped": 0})
        counts[outcome] += 1
        if self.warn is not None:
            self.warn(f"{document.shard}: record {document.record} ({len(document.text):,} characters) has more than "
                      f"data.max_document_tokens={self.max_document_tokens:,} tokens; {action}")

    def _path_domain(self, shard: str) -> str:
        if self.domain_from != "path":
            return ""
        domain = self._path_domains.get(shard)
        if domain is None:
            if is_dataset_source(shard):
                # A streamed dataset is one domain named after the dataset, unless records carry one.
                domain = Path(shard[len(DATASET_PREFIX) :].rpartition("#")[0]).name
            else:
                domain = domain_of(shard, self.domain_pattern)
            self._path_domains[shard] = domain
        return domain

    # -- resume ------------------------------------------------------------------------------

    def _snapshot(self) -> dict[str, Any]:
        """Everything the next unit depends on (cheap: the carry is under a block per domain)."""
        return {
            "shard_index": self._shard_index,
            "reader": None if self._reader is None or self._document is not None else self._reader.position(),
            "document": None if self._document is None else self._document.position(),
            "carry": self._packer.state_dict(),
            "closed": list(self._closed),
            "long_documents": {k: dict(v) for k, v in self._long_documents.items()},
            "problems": dict(self._problems),
            "tokens_read": self._tokens_read,
            "bytes_read": self._bytes_read,
            "blocks": [{"tokens": b.tokens.tolist(), "shard": b.shard, "domain": b.domain,
                        "spans": [list(s) for s in b.token_spans()]} for b in self._pending],
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": STREAM_FORMAT,
            "shards": list(self._names),
            "unit": self._unit if self._unit is not None else self._snapshot(),
            "handed_out": self._handed_out,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (or from a position written by olm 0.2)."""
        if state.get("format") != STREAM_FORMAT:
            state = _from_legacy_position(state)
        if list(self._names) != list(state["shards"]):
            raise DataError("the data position in the checkpoint belongs to a different shard plan")
        unit = state["unit"]
        self._restore_unit(unit)
        self._unit = unit
        self._handed_out = 0
        self.take(int(state["handed_out"]))  # handed out before the checkpoint: replay and drop
        self._finished = []  # shards they finished were reported (and checkpointed) already

    def _restore_unit(self, unit: dict[str, Any]) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = None
        self._document = None
        self._shard_index = int(unit["shard_index"])
        self._packer.load_state_dict(unit["carry"])
        self._closed = list(unit["closed"])
        self._finished = []
        self._long_documents = {k: dict(v) for k, v in unit["long_documents"].items()}
        self._problems = dict(unit["problems"])
        self._tokens_read = int(unit["tokens_read"])
        self._bytes_read = int(unit["bytes_read"])
        self._pending = [Block(np.asarray(b["tokens"], dtype=np.int32), b["shard"], b["domain"],
                               tuple((str(s), int(n)) for s, n in b["spans"])) for b in unit.get("blocks", [])]
        if unit.get("flush"):  # the end of an earlier plan, continued by a longer one (rebase_position)
            self._pending.extend(self._packer.flush(self.min_block_tokens))
        if self._shard_index >= len(self.shards):
            return
        document = unit["document"]
        if document is not None:
            reader = self._open_current()
            _seek(reader, document["start"])
            shard = self._names[self._shard_index]
            record = reader.read()
            if record is None or not record[0]:
                raise DataError(f"{shard}: the record the checkpoint was reading is gone (was the shard changed?)")
            domain = record[1] if record[1] is not None else self._path_domain(shard)
            self._document = _Document(record[0], domain, shard, int(document["record"]), document["start"],
                                       offset=int(document["offset"]), piece_tokens=int(document["piece_tokens"]),
                                       pieces=int(document["pieces"]))
        elif unit["reader"] is not None:
            _seek(self._open_current(), unit["reader"])


class _EmptyReader:
    """Stands in for a shard whose file could not even be opened as its format (it is quarantined)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records = 0

    def read(self) -> None:
        return None

    def position(self) -> dict[str, Any]:
        return {}

    def record_start(self) -> dict[str, Any]:
        return {}

    def seek(self, position: dict[str, Any]) -> None:
        pass

    def skip_records(self, count: int) -> None:
        pass

    def bytes_done(self) -> int:
        return 0

    def close(self) -> None:
        pass


def _seek(reader: RecordReader, position: dict[str, Any]) -> None:
    if "legacy_records" in position:
        reader.skip_records(int(position["legacy_records"]))
    else:
        reader.seek(position)


def _from_legacy_position(state: dict[str, Any]) -> dict[str, Any]:
    """A data position written by olm 0.2 (``datasets`` iterator, blocks never crossing shards).

    Its pending blocks are handed out first; the reader skips the records that position had
    consumed (``datasets`` counted one record per JSON line, txt paragraph or parquet row, as the
    readers here do). A position this cannot interpret is an error that says what to do.
    """
    try:
        shards = [str(s) for s in state["shards"]]
        index = int(state["shard_index"])
        document = state.get("document")
        reader: dict[str, Any] | None = None
        legacy_document = None
        dataset = index < len(shards) and is_dataset_source(shards[index])
        if document is not None:
            start: dict[str, Any] = ({"dataset_state": document["dataset_state"], "records": int(document["record"]) - 1}
                                     if dataset else {"legacy_records": int(document["record"]) - 1})
            legacy_document = {"start": start, "record": int(document["record"]), "offset": int(document["offset"]),
                               "piece_tokens": int(document["piece_tokens"]), "pieces": int(document["pieces"])}
        elif state.get("dataset_state") is not None:
            records = int(state.get("records_read", 0))
            reader = {"dataset_state": state["dataset_state"], "records": records} if dataset else {"legacy_records": records}
        carry_shard = shards[min(index, len(shards) - 1)] if shards else ""
        unit = {
            "shard_index": index, "reader": reader, "document": legacy_document,
            "carry": {domain: {"tokens": list(tokens), "spans": [[carry_shard, len(tokens)]]}
                      for domain, tokens in state["carry"].items() if tokens},
            "closed": list(state.get("finished_pending", [])),
            "long_documents": {k: dict(v) for k, v in state.get("long_documents", {}).items()},
            "problems": {}, "tokens_read": 0, "bytes_read": 0,
            "blocks": [{"tokens": list(p["tokens"]), "shard": p["shard"], "domain": p["domain"],
                        "spans": [[p["shard"], len(p["tokens"])]]} for p in state["pending"]],
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"cannot resume this data position ({exc!r}: not written by this olm); retrain the increment: "
                        "move the run's checkpoints of this increment aside") from None
    return {"format": STREAM_FORMAT, "shards": shards, "unit": unit, "handed_out": 0}


def position_unread_shards(state: dict[str, Any]) -> list[str]:
    """Shards a saved data position has not finished reading (the one being read first).

    Counted from the shard its unit began in, which a continuation reads again, so the list can
    start with shards whose last tokens are trained already: a plan re-lists them, and the
    engine does not reopen a shard the ledger has finished.
    """
    if is_lane_position(state):  # every lane's, lane by lane
        return list(dict.fromkeys(shard for lane in lane_positions(state) for shard in position_unread_shards(lane)))
    index = int(state["unit"]["shard_index"]) if state.get("format") == STREAM_FORMAT else int(state["shard_index"])
    return [str(s) for s in state["shards"][index:]]


def position_owned_shards(state: dict[str, Any]) -> list[str]:
    """Shards a saved data position still has tokens of: every one the planner must leave to it.

    That is the shards it has not finished reading (:func:`position_unread_shards`) and those it
    has read to their end whose last tokens wait in its carry or in blocks it has cut. The latter
    are not in the unread list, nor in the shard plan of an increment after the one that read
    them, yet a tail can wait in its domain's carry for several increments while new data reaches
    only other domains: planned afresh from the ledger, such a shard would be trained twice.
    """
    if is_lane_position(state):
        return list(dict.fromkeys(shard for lane in lane_positions(state) for shard in position_owned_shards(lane)))
    if state.get("format") != STREAM_FORMAT:  # olm 0.2: shards read to their end, blocks cut from them
        held = [*state.get("finished_pending", []), *(block["shard"] for block in state.get("pending", []))]
    else:
        unit = state["unit"]
        held = [*unit["closed"],
                *(shard for carry in unit["carry"].values() for shard, _ in carry["spans"]),
                *(shard for block in unit.get("blocks", []) for shard, _ in block["spans"])]
    return list(dict.fromkeys([*map(str, held), *position_unread_shards(state)]))


def position_has_work(state: dict[str, Any] | None) -> bool:
    """Whether a saved data position still holds data: unread shards, blocks or a carry."""
    if not state:
        return False
    if (state.get("shuffle") or {}).get("buffered"):
        return True  # blocks waiting in the training stream's shuffle buffer (olm_cli/pipeline.py)
    if is_lane_position(state):
        return any(position_has_work(lane) for lane in lane_positions(state))
    if state.get("format") != STREAM_FORMAT:
        return bool(position_unread_shards(state) or state.get("pending"))
    unit = state["unit"]
    return bool(position_unread_shards(state) or unit["carry"] or unit["document"]
                or len(unit.get("blocks", [])) > int(state["handed_out"]))


def rebase_position(state: dict[str, Any], plan: Sequence[Path]) -> dict[str, Any]:
    """Continue a previous increment's data position with a longer shard plan.

    The plan starts with the shards the position had not finished (:func:`position_unread_shards`),
    so the saved unit, replayed over it, cuts the same first blocks: reading more documents only
    adds blocks after them. Except at the end of the old plan, where the unit flushed its carry
    into final blocks instead of reading: if some of those were handed out (trained, or put in
    the shuffle buffer), the unit is marked to flush first again, or its replay would cut other
    blocks from the new data and drop those as handed out (tokens lost, others trained twice).
    With none handed out, the carry simply continues into the new data.

    A position in lanes rebases every lane onto its own unread shards plus the plan's other
    shards, dealt to the lanes by :func:`assign_lanes` counting the bytes each lane still has
    to read; the lane count and the lanes' rotation stay as they were.
    """
    if is_lane_position(state):
        lanes = lane_positions(state)
        unread = [position_unread_shards(lane) for lane in lanes]
        carried = {shard for shards in unread for shard in shards}
        loads = [sum(shard_bytes(Path(shard)) for shard in shards) for shards in unread]
        new = assign_lanes([p for p in plan if str(p) not in carried], len(lanes), loads)
        rebased = [rebase_position(lane, [Path(s) for s in [*own, *more]])
                   for lane, own, more in zip(lanes, unread, new, strict=True)]
        return {**state, "shards": [str(p) for p in plan], "lanes": rebased}
    if state.get("format") != STREAM_FORMAT:
        state = _from_legacy_position(state)
    unit = dict(state["unit"])
    flushing = int(unit["shard_index"]) >= len(state["shards"]) and unit["document"] is None
    if flushing and int(state["handed_out"]):
        unit["flush"] = True
    unit["shard_index"] = 0
    return {**state, "shards": [str(p) for p in plan], "unit": unit}


def is_lane_position(state: dict[str, Any] | None) -> bool:
    """Whether a saved position is split into lanes (more than one; one lane is saved plain)."""
    return bool(state) and isinstance(state, dict) and isinstance(state.get("lanes"), list)


def lane_positions(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain :class:`BlockStream` positions of a saved position, one per lane (one for a plain one)."""
    return [dict(lane) for lane in state["lanes"]] if is_lane_position(state) else [state]


def read_blocks(
    path: Path,
    tokenizer: Any,
    *,
    block_size: int,
    max_tokens: int | None = None,
    fmt: str = "auto",
    text_field: str = "text",
    domain: str = "eval",
) -> list[Block]:
    """All blocks of one file (for held-out evaluation and replay warm starts), up to ``max_tokens``."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file")
    validate_shard(Path(path), shard_format(path, fmt), text_field)
    stream = BlockStream(
        [Path(path)],
        tokenizer,
        block_size=block_size,
        fmt=fmt,
        text_field=text_field,
        domain_from="path",
        domain_pattern=r"(?P<domain>.+)",
        min_block_tokens=2,
    )
    blocks: list[Block] = []
    total = 0
    while max_tokens is None or total < max_tokens:
        batch = stream.take(16)
        if not batch:
            break
        for block in batch:
            blocks.append(Block(block.tokens, block.shard, domain))
            total += len(block)
    return blocks
