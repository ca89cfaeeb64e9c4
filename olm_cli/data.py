"""Shards in, token blocks out.

* :func:`discover_shards` expands the recipe's files/directories/globs (re-run on every
  invocation, so new shards are picked up).
* :func:`validate_shard` reads a shard once before training so that bad input (malformed JSON,
  non-UTF-8 bytes, binary files, empty shards) is quarantined up front with a reason naming the
  line, instead of failing halfway through an increment.
* :class:`BlockStream` streams the planned shards with ``datasets`` (``streaming=True``),
  tokenizes, and packs documents joined by EOS into blocks of ``block_size`` tokens. Its
  :meth:`~BlockStream.state_dict` (shard index, the ``datasets`` iterator state, the packer's
  carry-over tokens) lets a resumed run continue exactly where the checkpoint was taken.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from olm_cli.errors import DataError
from olm_cli.samples import Block

logger = logging.getLogger(__name__)

DATASET_PREFIX = "dataset:"
SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")


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


def discover_shards(patterns: Sequence[str]) -> list[Path]:
    """Expand files, directories and globs into a sorted, de-duplicated list of shard files."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            candidates = [p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(SHARD_SUFFIXES)]
        elif any(ch in pattern for ch in "*?["):
            candidates = [Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()]
        elif path.is_file():
            candidates = [path]
        else:
            raise DataError(f"{pattern}: no such shard file or directory (data.shards)")
        for candidate in candidates:
            resolved = candidate.resolve()
            found[str(resolved)] = resolved
    return [found[key] for key in sorted(found)]


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
        import pyarrow.parquet as pq

        try:
            meta = pq.read_metadata(path)
            schema = pq.read_schema(path)
        except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
            raise DataError(f"{path}: not a readable parquet file ({exc})") from None
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {', '.join(schema.names)}")
        if meta.num_rows == 0:
            raise DataError(f"{path}: empty shard (0 rows)")
        return int(meta.num_rows)

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


@dataclass
class _Packer:
    """Joins tokenized documents with EOS and cuts fixed-length blocks, one carry buffer per domain."""

    block_size: int
    eos_id: int
    carry: dict[str, list[int]] = field(default_factory=dict)

    def push(self, domain: str, ids: list[int]) -> Iterator[tuple[str, np.ndarray]]:
        buffer = self.carry.setdefault(domain, [])
        buffer.extend(ids)
        buffer.append(self.eos_id)
        while len(buffer) >= self.block_size:
            yield domain, np.asarray(buffer[: self.block_size], dtype=np.int32)
            del buffer[: self.block_size]

    def flush(self, min_tokens: int) -> Iterator[tuple[str, np.ndarray]]:
        for domain in sorted(self.carry):
            buffer = self.carry[domain]
            if len(buffer) >= min_tokens:
                yield domain, np.asarray(buffer, dtype=np.int32)
        self.carry.clear()


class BlockStream:
    """Streams token blocks from an ordered list of shards, resumable at any block boundary.

    Blocks never cross shards (a shard's tail becomes one shorter block), so every block has one
    shard and one domain, and "shard finished" is a well-defined event for the ledger.
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
    ) -> None:
        self.shards = [Path(s) for s in shards]
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.fmt = fmt
        self.text_field = text_field
        self.domain_from = domain_from
        self.domain_pattern = domain_pattern
        self.domain_field = domain_field
        self.min_block_tokens = min_block_tokens
        eos = tokenizer.eos_token_id
        if eos is None:
            raise DataError("the tokenizer has no EOS token; packing needs one to separate documents")
        self._eos = int(eos)
        # Position: the shard being read, the datasets iterator state inside it, and blocks already
        # cut from the current document batch but not yet handed out.
        self._shard_index = 0
        self._dataset: Any = None
        self._iterator: Iterator[dict[str, Any]] | None = None
        # datasets resets an iterator's reported state until it yields again; until then the
        # position is the one we loaded (a checkpoint taken right after a resume needs it).
        self._loaded_dataset_state: dict[str, Any] | None = None
        self._packer = _Packer(block_size, self._eos)
        self._pending: list[Block] = []
        self._finished_shards: list[str] = []
        # Shards whose reader is closed but whose last blocks may still be pending.
        self._finished_pending: list[str] = []

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
        path = self.shards[self._shard_index]
        self._dataset = _load_streaming(path, shard_format(path, self.fmt))
        self._iterator = iter(self._dataset)

    def _refill(self) -> bool:
        """Read documents until at least one block is pending; False when all shards are done."""
        while not self._pending:
            if self._shard_index >= len(self.shards):
                return False
            if self._iterator is None:
                self._open_current()
            path = self.shards[self._shard_index]
            assert self._iterator is not None
            try:
                record = next(self._iterator)
                self._loaded_dataset_state = None
            except StopIteration:
                domain = self._path_domain(path)
                for block_domain, tokens in self._packer.flush(self.min_block_tokens):
                    self._pending.append(Block(tokens, str(path), block_domain or domain))
                self._finished_pending.append(str(path))
                self._shard_index += 1
                self._dataset = self._iterator = None
                if not self._pending:
                    self._note_finished()
                continue
            except Exception as exc:  # datasets wraps parser errors in many types
                raise DataError(f"{path}: failed while streaming ({exc})") from None
            text = record.get(self.text_field)
            if not isinstance(text, str):
                raise DataError(f"{path}: record without string field {self.text_field!r}")
            if not text:
                continue
            domain = self._record_domain(path, record)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            for block_domain, tokens in self._packer.push(domain, ids):
                self._pending.append(Block(tokens, str(path), block_domain))
        return True

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
            "carry": {k: list(v) for k, v in self._packer.carry.items()},
            "pending": [
                {"tokens": b.tokens.tolist(), "shard": b.shard, "domain": b.domain} for b in self._pending
            ],
            "finished_pending": list(self._finished_pending),
        }

    def _dataset_position(self) -> dict[str, Any] | None:
        if self._dataset is None:
            return None
        if self._loaded_dataset_state is not None:
            return self._loaded_dataset_state
        return self._dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if [str(s) for s in self.shards] != list(state["shards"]):
            raise DataError("the data position in the checkpoint belongs to a different shard plan")
        self._shard_index = int(state["shard_index"])
        self._packer.carry = {k: list(v) for k, v in state["carry"].items()}
        self._pending = [
            Block(np.asarray(p["tokens"], dtype=np.int32), p["shard"], p["domain"]) for p in state["pending"]
        ]
        self._finished_pending = list(state.get("finished_pending", []))
        self._finished_shards = []
        self._dataset = self._iterator = None
        if state["dataset_state"] is not None and self._shard_index < len(self.shards):
            self._open_current()
            self._dataset.load_state_dict(state["dataset_state"])
            self._iterator = iter(self._dataset)
            self._loaded_dataset_state = state["dataset_state"]


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
