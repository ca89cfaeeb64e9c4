"""Shards in, token blocks out.

* :func:`discover_shards` expands the recipe's files/directories/globs (re-run on every
  invocation, so new shards are picked up). A pattern that matches nothing is a recipe error
  (a typo or an unmounted disk must not look like a quiet night), and matches that are not
  regular files (FIFOs, devices, symlink loops) are returned too, so the ledger quarantines them
  with a reason instead of dropping them unseen.
* :func:`validate_shard` reads a shard once before training so that bad input (malformed JSON,
  non-UTF-8 bytes, binary files, empty shards) is quarantined up front with a reason naming the
  line, instead of failing halfway through an increment.
* :class:`BlockStream` streams the planned shards with ``datasets`` (``streaming=True``),
  tokenizes, and packs documents joined by EOS into blocks of ``block_size`` tokens. Long texts
  are tokenised in whitespace-aligned chunks, one chunk per refill, so a 50 MB record costs the
  same per token as small ones and never blocks a stop request; a document over
  ``max_document_tokens`` is split into pieces or skipped with a warning. Its
  :meth:`~BlockStream.state_dict` (shard index, the ``datasets`` iterator state, the packer's
  carry-over tokens) lets a resumed run continue exactly where the checkpoint was taken.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from olm_cli.errors import DataError, RecipeError
from olm_cli.rundir.ledger import file_kind_problem, shard_key
from olm_cli.samples import Block

logger = logging.getLogger(__name__)

DATASET_PREFIX = "dataset:"
SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")
# Texts longer than this are tokenised a chunk at a time: one tokenizer call on a 50 MB string
# takes tens of seconds, holds every token in a Python list, and cannot be interrupted.
DOCUMENT_CHUNK_CHARS = 256 * 1024
LONG_DOCUMENT_POLICIES = ("split", "skip")


def shard_format(path: Path | str, declared: str = "auto") -> str:
    if str(path).startswith(DATASET_PREFIX):
        return "dataset"
    if declared != "auto":
        return declared
    name = str(path).lower().removesuffix(".gz")
    if name.endswith((".jsonl", ".json")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".txt"):
        return "txt"
    raise DataError(f"{path}: unknown shard format (use .jsonl, .parquet, .txt or set data.format)")


def discover_shards(
    patterns: Sequence[str], *, setting: str = "data.shards", allow_empty: bool = False
) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of shard paths.

    Every pattern must match at least one file, unless ``allow_empty``: otherwise a misspelt
    glob or an unmounted disk reads as "nothing new" night after night. The error names the
    recipe ``setting`` and the pattern's index. Regular files come back symlink-resolved (the
    ledger's key); anything else that matched (a FIFO, a device, a symlink loop or a link to
    one of those) comes back under its own absolute path, for the ledger to quarantine.
    """
    found: dict[str, Path] = {}
    for index, pattern in enumerate(patterns):
        candidates = _expand_pattern(pattern)
        if not candidates and not allow_empty:
            raise RecipeError(f"{setting}[{index}]: {pattern!r} matches no file")
        for candidate in candidates:
            resolved = shard_key(candidate)
            found[str(resolved)] = resolved
    return [found[key] for key in sorted(found)]


def _expand_pattern(pattern: str) -> list[Path]:
    path = Path(pattern)
    if path.is_dir():
        return [p for p in path.rglob("*") if not p.is_dir() and p.name.lower().endswith(SHARD_SUFFIXES)]
    if any(ch in pattern for ch in "*?["):
        return [Path(p) for p in glob.glob(pattern, recursive=True) if not Path(p).is_dir()]
    return [path] if os.path.lexists(path) else []


def domain_of(path: Path | str, pattern: str) -> str:
    matches = list(re.finditer(pattern, Path(path).as_posix()))
    match = matches[-1] if matches else None  # the right-most match: the innermost folder
    if match is None or not match.group("domain"):
        raise DataError(f"{path}: data.domain_pattern {pattern!r} does not match this path")
    return match.group("domain")


def _open_text(path: Path) -> io.BufferedReader | gzip.GzipFile:
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def validate_shard(path: Path, fmt: str, text_field: str) -> int:
    """Read the whole shard once; return its document count or raise :class:`DataError`.

    The message names the file and the first bad line, which is what an operator needs to fix it.
    """
    if fmt == "parquet":
        return _validate_parquet(path, text_field)

    documents = 0
    try:
        with _open_text(path) as handle:
            for lineno, raw in enumerate(handle, start=1):
                if b"\x00" in raw:
                    raise DataError(f"{path}:{lineno}: binary data (NUL byte); not a text shard")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: not UTF-8 (byte {exc.start} of the line)") from None
                if fmt == "txt":
                    documents += bool(line.strip())
                    continue
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise DataError(f"{path}:{lineno}: record has no string field {text_field!r} (data.text_field)")
                documents += 1
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read shard ({exc})") from None
    if documents == 0:
        raise DataError(f"{path}: empty shard (no documents)")
    return documents


def _validate_parquet(path: Path, text_field: str) -> int:
    """Check the footer, the schema and every row group's text column.

    The footer alone can be intact while a row group's pages are corrupt; reading each row
    group's text column (one column, one row group at a time) finds that before training
    instead of failing in the middle of it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({_one_line(exc)})") from None
    with parquet:
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {', '.join(names)}")
        column_type = parquet.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_field!r} is {column_type}, not text (data.text_field)")
        for group in range(parquet.num_row_groups):
            try:
                parquet.read_row_group(group, columns=[text_field])
            except Exception as exc:  # decompression, thrift and arrow errors alike
                raise DataError(f"{path}: row group {group} is unreadable ({_one_line(exc)})") from None
        rows = int(parquet.metadata.num_rows)
    if rows == 0:
        raise DataError(f"{path}: empty shard (0 rows)")
    return rows


def _require_regular_file(path: Path) -> None:
    """Refuse a FIFO or a device before a reader opens it (and blocks, or never ends).

    Shards are checked by the ledger's scan; this covers every other file a stream reads
    (``replay.seed_from``, evaluation sets) and a shard swapped after the scan.
    """
    try:
        problem = file_kind_problem(os.stat(path).st_mode)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if problem is not None:
        raise DataError(f"{path}: {problem}")


def _one_line(exc: BaseException) -> str:
    """pyarrow's messages span lines; a quarantine reason is one line of the nightly log."""
    return " ".join(str(exc).split())


def dataset_source(name: str, split: str) -> Path:
    """The pseudo-shard that stands for a whole streamed dataset (hub id or local directory)."""
    return Path(f"{DATASET_PREFIX}{name}#{split}")


def is_dataset_source(path: Path | str) -> bool:
    return str(path).startswith(DATASET_PREFIX)


def _load_streaming(path: Path, fmt: str) -> Any:
    from datasets import load_dataset

    if is_dataset_source(path):
        name, _, split = str(path)[len(DATASET_PREFIX) :].rpartition("#")
        try:
            return load_dataset(name, split=split, streaming=True)
        except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
            raise DataError(f"data.dataset={name!r}: cannot stream split {split!r} ({exc})") from None
    builder = {"jsonl": "json", "parquet": "parquet", "txt": "text"}[fmt]
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if fmt == "txt" else {}
    return load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)


def chunk_end(text: str, start: int, size: int = DOCUMENT_CHUNK_CHARS) -> int:
    """Where the chunk of ``text`` that begins at ``start`` should end (at most ``size`` chars).

    The cut goes just before a space or newline, so the next chunk starts with the whitespace
    that a byte-level BPE attaches to the following word: tokenising the chunks one by one
    gives the same tokens as tokenising the whole text. A text with no whitespace in the
    window is cut at ``size``.
    """
    limit = start + size
    if limit >= len(text):
        return len(text)
    cut = max(text.rfind(" ", start + 1, limit + 1), text.rfind("\n", start + 1, limit + 1))
    return cut if cut > start else limit


@dataclass
class _Packer:
    """Joins tokenized documents with EOS and cuts fixed-length blocks, one carry buffer per domain.

    Blocks are cut from one array and the carry is trimmed once per push, so packing is linear
    in the tokens pushed (deleting one block at a time from the front of a list was quadratic:
    a 2M-token document took 38 s). A document may arrive in several pushes; only the push with
    ``end_of_document`` appends the EOS, so the blocks are the same however it was cut.
    """

    block_size: int
    eos_id: int
    carry: dict[str, list[int]] = field(default_factory=dict)

    def push(self, domain: str, ids: Sequence[int], *, end_of_document: bool = True) -> list[tuple[str, np.ndarray]]:
        buffer = self.carry.setdefault(domain, [])
        buffer.extend(ids)
        if end_of_document:
            buffer.append(self.eos_id)
        full = len(buffer) - len(buffer) % self.block_size
        if not full:
            return []
        rows = np.asarray(buffer[:full], dtype=np.int32).reshape(-1, self.block_size)
        del buffer[:full]
        return [(domain, row.copy()) for row in rows]

    def flush(self, min_tokens: int) -> Iterator[tuple[str, np.ndarray]]:
        for domain in sorted(self.carry):
            buffer = self.carry[domain]
            if len(buffer) >= min_tokens:
                yield domain, np.asarray(buffer, dtype=np.int32)
        self.carry.clear()


@dataclass
class _Document:
    """The record being tokenised, a chunk per refill.

    ``start_state`` is the ``datasets`` position *before* the record: a checkpoint taken in
    the middle of a long document stores it with ``offset`` (characters done) instead of the
    rest of the text, and a resume reads the record again and continues at ``offset``.
    """

    text: str
    domain: str
    record: int  # 1-based record number inside the shard, for messages
    start_state: dict[str, Any] | None
    offset: int = 0
    piece_tokens: int = 0  # tokens of the current piece already packed
    pieces: int = 1

    def position(self) -> dict[str, Any]:
        return {"dataset_state": self.start_state, "record": self.record, "offset": self.offset,
                "piece_tokens": self.piece_tokens, "pieces": self.pieces}


class BlockStream:
    """Streams token blocks from an ordered list of shards, resumable at any block boundary.

    Blocks never cross shards (a shard's tail becomes one shorter block), so every block has one
    shard and one domain, and "shard finished" is a well-defined event for the ledger.

    A document longer than ``max_document_tokens`` is split into pieces of at most that many
    tokens, each packed like a document (``long_documents="split"``), or left out
    (``"skip"``); either way ``warn`` gets one line naming the shard and record, and
    :meth:`long_document_counts` says how many for the ledger.
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
    ) -> None:
        if max_document_tokens < 1:
            raise ValueError(f"max_document_tokens must be at least 1, got {max_document_tokens}")
        if long_documents not in LONG_DOCUMENT_POLICIES:
            raise ValueError(f"long_documents must be one of {LONG_DOCUMENT_POLICIES}, got {long_documents!r}")
        self.shards = [Path(s) for s in shards]
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
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token; packing needs one to separate documents")
        self._eos = int(eos)
        # Position: the shard being read, the datasets iterator state inside it, the document
        # being tokenised, and blocks already cut but not yet handed out.
        self._shard_index = 0
        self._dataset: Any = None
        self._iterator: Iterator[dict[str, Any]] | None = None
        # datasets resets an iterator's reported state until it yields again; until then the
        # position is the one we loaded (a checkpoint taken right after a resume needs it).
        self._loaded_dataset_state: dict[str, Any] | None = None
        self._records_read = 0
        self._document: _Document | None = None
        self._packer = _Packer(block_size, self._eos)
        self._pending: list[Block] = []
        self._finished_shards: list[str] = []
        # Shards whose reader is closed but whose last blocks may still be pending.
        self._finished_pending: list[str] = []
        # shard -> {"split": n, "skipped": n}: long documents met so far (part of the position,
        # so a resumed stream neither loses nor double-counts them).
        self._long_documents: dict[str, dict[str, int]] = {}

    # -- iteration ---------------------------------------------------------------------------

    @property
    def exhausted(self) -> bool:
        return self._shard_index >= len(self.shards) and not self._pending

    def at_end(self) -> bool:
        """True when no block is left; reads ahead (into pending blocks) to find out.

        A step budget can end exactly on a shard's last kept block, before the reader has seen the
        end of the file; this closes such a shard so the ledger can call it done.
        """
        if self._pending:
            return False
        return not self._refill()

    def take_finished_shards(self) -> list[str]:
        """Shards whose last block has been handed out since the previous call."""
        finished, self._finished_shards = self._finished_shards, []
        return finished

    def long_document_counts(self, shard: str) -> dict[str, int]:
        """``{"split": n, "skipped": n}``: documents of ``shard`` over ``max_document_tokens``."""
        return dict(self._long_documents.get(shard, {"split": 0, "skipped": 0}))

    def take(self, n: int) -> list[Block]:
        """Up to ``n`` blocks (fewer only when every shard is exhausted)."""
        out: list[Block] = []
        while len(out) < n:
            if not self._pending and not self._refill():
                break
            need = n - len(out)
            out.extend(self._pending[:need])
            del self._pending[:need]
            self._note_finished()
        return out

    def _note_finished(self) -> None:
        # A shard is finished once its reader is closed and none of its blocks are still pending.
        while self._finished_pending and not any(b.shard == self._finished_pending[0] for b in self._pending):
            self._finished_shards.append(self._finished_pending.pop(0))

    def _open_current(self) -> None:
        self._loaded_dataset_state = None
        self._records_read = 0
        path = self.shards[self._shard_index]
        if not is_dataset_source(path):
            _require_regular_file(path)
        self._dataset = _load_streaming(path, shard_format(path, self.fmt))
        self._iterator = iter(self._dataset)

    def _next_record(self, path: Path) -> dict[str, Any] | None:
        """The next record of the current shard, or ``None`` at its end."""
        assert self._iterator is not None
        try:
            record = next(self._iterator)
        except StopIteration:
            return None
        except Exception as exc:  # datasets wraps parser errors in many types
            raise DataError(f"{path}: failed while streaming ({_one_line(exc)})") from None
        self._loaded_dataset_state = None
        self._records_read += 1
        return record

    def _refill(self) -> bool:
        """Read until at least one block is pending; False when all shards are done.

        Each pass tokenises at most one chunk of a long document, so the caller gets its blocks
        (and the engine a chance to see a stop request) after a bounded amount of work.
        """
        while not self._pending:
            if self._document is not None:
                self._feed_document()
                continue
            if self._shard_index >= len(self.shards):
                return False
            if self._iterator is None:
                self._open_current()
            path = self.shards[self._shard_index]
            start_state = self._dataset_position()
            record = self._next_record(path)
            if record is None:
                self._close_shard(path)
                continue
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(f"{path}: record without string field {self.text_field!r}")
            if not text:
                continue
            self._document = _Document(text, self._record_domain(path, record), self._records_read, start_state)
        return True

    def _close_shard(self, path: Path) -> None:
        domain = self._path_domain(path)
        for block_domain, tokens in self._packer.flush(self.min_block_tokens):
            self._pending.append(Block(tokens, str(path), block_domain or domain))
        self._finished_pending.append(str(path))
        self._shard_index += 1
        self._dataset = self._iterator = None
        if not self._pending:
            self._note_finished()

    def _tokenize_chunk(self, document: _Document) -> list[int]:
        end = chunk_end(document.text, document.offset, self.chunk_chars)
        # verbose=False: documents are longer than the model's context by design (they are packed).
        ids = self.tokenizer(document.text[document.offset : end], add_special_tokens=False, verbose=False)["input_ids"]
        document.offset = end
        return list(ids)

    def _feed_document(self) -> None:
        """Tokenise the next chunk of the current document and pack it."""
        document = self._document
        assert document is not None
        shard = str(self.shards[self._shard_index])
        if self.long_documents == "skip":
            self._feed_whole_or_skip(document, shard)
            return
        ids = self._tokenize_chunk(document)
        done = document.offset >= len(document.text)
        cap = self.max_document_tokens
        start = 0
        while len(ids) - start > cap - document.piece_tokens:
            # This piece is full and more tokens follow: close it like a document.
            room = cap - document.piece_tokens
            self._pack(shard, document.domain, ids[start : start + room], end_of_document=True)
            start += room
            document.piece_tokens = 0
            document.pieces += 1
            if document.pieces == 2:
                self._count_long(shard, "split")
                self._warn_long(shard, document, "split into pieces of at most that many tokens")
        document.piece_tokens += len(ids) - start
        self._pack(shard, document.domain, ids[start:], end_of_document=done)
        if done:
            self._document = None

    def _feed_whole_or_skip(self, document: _Document, shard: str) -> None:
        """Skip policy: tokenise up to the cap; pack the document only if it fits.

        At most ``max_document_tokens`` tokens (plus one chunk) are tokenised, in this one call,
        so a skipped document is never half-packed and never needs a mid-document position.
        """
        ids: list[int] = []
        while document.offset < len(document.text) and len(ids) <= self.max_document_tokens:
            ids.extend(self._tokenize_chunk(document))
        self._document = None
        if len(ids) > self.max_document_tokens:
            self._count_long(shard, "skipped")
            self._warn_long(shard, document, "skipped (data.long_documents: skip)")
            return
        self._pack(shard, document.domain, ids, end_of_document=True)

    def _pack(self, shard: str, domain: str, ids: Sequence[int], *, end_of_document: bool) -> None:
        for block_domain, tokens in self._packer.push(domain, ids, end_of_document=end_of_document):
            self._pending.append(Block(tokens, shard, block_domain))

    def _count_long(self, shard: str, outcome: str) -> None:
        counts = self._long_documents.setdefault(shard, {"split": 0, "skipped": 0})
        counts[outcome] += 1

    def _warn_long(self, shard: str, document: _Document, action: str) -> None:
        if self.warn is not None:
            self.warn(f"{shard}: record {document.record} ({len(document.text):,} characters) has more than "
                      f"data.max_document_tokens={self.max_document_tokens:,} tokens; {action}")

    def _path_domain(self, path: Path) -> str:
        if self.domain_from != "path":
            return ""
        if is_dataset_source(path):
            # A streamed dataset is one domain named after the dataset, unless records carry one.
            return Path(str(path)[len(DATASET_PREFIX) :].rpartition("#")[0]).name
        return domain_of(path, self.domain_pattern)

    def _record_domain(self, path: Path, record: dict[str, Any]) -> str:
        if self.domain_from == "path":
            return self._path_domain(path)
        value = record.get(self.domain_field)
        if not isinstance(value, str) or not value:
            raise DataError(f"{path}: record without string field {self.domain_field!r} (data.domain_field)")
        return value

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "shards": [str(s) for s in self.shards],
            "shard_index": self._shard_index,
            "dataset_state": self._dataset_position(),
            "records_read": self._records_read,
            "document": None if self._document is None else self._document.position(),
            "carry": {k: list(v) for k, v in self._packer.carry.items()},
            "pending": [
                {"tokens": b.tokens.tolist(), "shard": b.shard, "domain": b.domain} for b in self._pending
            ],
            "finished_pending": list(self._finished_pending),
            "long_documents": {k: dict(v) for k, v in self._long_documents.items()},
        }

    def _dataset_position(self) -> dict[str, Any] | None:
        if self._dataset is None:
            return None
        if self._loaded_dataset_state is not None:
            return self._loaded_dataset_state
        return self._dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (states written before long-document support load too)."""
        if [str(s) for s in self.shards] != list(state["shards"]):
            raise DataError("the data position in the checkpoint belongs to a different shard plan")
        self._shard_index = int(state["shard_index"])
        self._packer.carry = {k: list(v) for k, v in state["carry"].items()}
        self._pending = [
            Block(np.asarray(p["tokens"], dtype=np.int32), p["shard"], p["domain"]) for p in state["pending"]
        ]
        self._finished_pending = list(state.get("finished_pending", []))
        self._finished_shards = []
        self._long_documents = {k: dict(v) for k, v in state.get("long_documents", {}).items()}
        self._dataset = self._iterator = None
        self._document = None
        if self._shard_index >= len(self.shards):
            return
        document = state.get("document")
        if document is not None:
            self._reopen_document(document)
        elif state["dataset_state"] is not None:
            self._open_current()
            self._seek(state["dataset_state"])
        self._records_read = int(state.get("records_read", 0))

    def _seek(self, dataset_state: dict[str, Any]) -> None:
        self._dataset.load_state_dict(dataset_state)
        self._iterator = iter(self._dataset)
        self._loaded_dataset_state = dataset_state

    def _reopen_document(self, position: dict[str, Any]) -> None:
        """Read the half-tokenised record again from its start position and skip what was done."""
        self._open_current()
        if position["dataset_state"] is not None:
            self._seek(position["dataset_state"])
        path = self.shards[self._shard_index]
        record = self._next_record(path)
        if record is None or not isinstance(record.get(self.text_field), str):
            raise DataError(f"{path}: the record the checkpoint was reading is gone (was the shard changed?)")
        self._document = _Document(
            record[self.text_field], self._record_domain(path, record), int(position["record"]),
            position["dataset_state"], offset=int(position["offset"]),
            piece_tokens=int(position["piece_tokens"]), pieces=int(position["pieces"]),
        )


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
