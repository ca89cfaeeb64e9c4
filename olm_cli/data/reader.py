"""Record readers for local shards, without ``datasets``: plain buffered reads, exact positions.

One reader per open shard. :meth:`read` returns the next ``(text, domain)`` record (``domain``
is ``None`` unless a ``domain_field`` is read), or ``None`` at the end of the file, and raises
:class:`BadRecord` naming ``file:line`` (or the row group) when a record cannot be used: bad
records are found while the shard is read for training, not by a separate full pass before it.

Positions (:meth:`position`, :meth:`record_start`) are small JSON objects, exact at every record:

* jsonl / json (JSON Lines) and txt: the byte offset of the next unread line, plus the line and
  record counters (for messages). ``.gz`` shards use the *decompressed* offset; seeking there
  decompresses the file again from its start (gzip has no random access), so a resume inside a
  large ``.gz`` shard costs one re-read of its head.
* parquet: row group and row within it (pyarrow reads one row group's text column at a time).
* a ``datasets`` source (hub id or dataset directory): the ``datasets`` iterator state.

txt shards keep the ``datasets`` "text" builder's ``sample_by: paragraph`` documents: the text is
cut at every ``"\\n\\n"`` (so blank lines separate documents; a document keeps its single
newlines, and the last one its trailing newline), empty pieces are dropped, and ``\\r\\n`` reads
as ``\\n``. One difference: a lone ``\\r`` (old Mac line ends) is not a line break here.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import Path
from typing import Any, Protocol

Record = tuple[str, str | None]


class BadRecord(Exception):  # noqa: N818 - a condition of the data, not a program error
    """A record that cannot be trained; the message is the one-line reason (``file:line: ...``)."""


class RecordReader(Protocol):
    """What the block stream needs from a shard reader."""

    path: Path
    records: int  # records returned so far (1-based number of the last one)

    def read(self) -> Record | None: ...

    def position(self) -> dict[str, Any]: ...

    def record_start(self) -> dict[str, Any]:
        """The position just before the record :meth:`read` returned last."""
        ...

    def seek(self, position: dict[str, Any]) -> None: ...

    def skip_records(self, count: int) -> None:
        """Read ``count`` records (positions written by olm 0.2 count records, not bytes)."""
        ...

    def bytes_done(self) -> int:
        """File bytes consumed (compressed bytes for .gz, a row share for parquet): for estimates."""
        ...

    def close(self) -> None: ...


def open_reader(path: Path, fmt: str, text_field: str, domain_field: str | None = None) -> RecordReader:
    if fmt == "jsonl":
        return JsonLinesReader(path, text_field, domain_field)
    if fmt == "txt":
        return ParagraphReader(path)
    if fmt == "parquet":
        return ParquetReader(path, text_field, domain_field)
    if fmt == "dataset":
        return DatasetReader(path, text_field, domain_field)
    raise ValueError(f"unknown shard format {fmt!r}")


def _open_binary(path: Path) -> io.BufferedReader | gzip.GzipFile:
    return gzip.open(path, "rb") if str(path).lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _decode(path: Path, line: int, raw: bytes) -> str:
    if b"\x00" in raw:
        raise BadRecord(f"{path}:{line}: binary data (NUL byte); not a text shard")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"{path}:{line}: not UTF-8 (byte {exc.start} of the line)") from None


class _LineReader:
    """Shared by the text formats: a binary line iterator that knows its byte offset and line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._handle = _open_binary(self.path)
        self._offset = 0  # byte offset (decompressed for .gz) of the next unread line
        self._line = 0  # lines read
        self.records = 0
        self._start = (0, 0, 0)

    def _next_line(self) -> bytes:
        raw = self._handle.readline()
        self._offset += len(raw)
        self._line += bool(raw)
        return raw

    def position(self) -> dict[str, Any]:
        return {"offset": self._offset, "line": self._line, "records": self.records}

    def record_start(self) -> dict[str, Any]:
        offset, line, records = self._start
        return {"offset": offset, "line": line, "records": records}

    def seek(self, position: dict[str, Any]) -> None:
        self._handle.seek(int(position["offset"]))
        self._offset, self._line, self.records = int(position["offset"]), int(position["line"]), int(position["records"])

    def skip_records(self, count: int) -> None:
        while self.records < count and self.read() is not None:  # type: ignore[attr-defined]
            pass

    def bytes_done(self) -> int:
        raw = getattr(self._handle, "fileobj", None)  # a GzipFile's compressed file
        return int(raw.tell()) if raw is not None else self._offset

    def close(self) -> None:
        self._handle.close()


class JsonLinesReader(_LineReader):
    """One JSON object per line; blank lines are skipped."""

    def __init__(self, path: Path, text_field: str, domain_field: str | None = None) -> None:
        super().__init__(path)
        self.text_field = text_field
        self.domain_field = domain_field

    def read(self) -> Record | None:
        while True:
            start = self._offset
            raw = self._next_line()
            if not raw:
                return None
            if raw.isspace():
                continue
            line = _decode(self.path, self._line, raw)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadRecord(f"{self.path}:{self._line}: malformed JSON ({exc.msg})") from None
            text = record.get(self.text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise BadRecord(f"{self.path}:{self._line}: record has no string field {self.text_field!r} (data.text_field)")
            domain = None
            if self.domain_field is not None:
                domain = record.get(self.domain_field)
                if not isinstance(domain, str) or not domain:
                    raise BadRecord(f"{self.path}:{self._line}: record has no string field "
                                    f"{self.domain_field!r} (data.domain_field)")
            self._start = (start, self._line - 1, self.records)
            self.records += 1
            return text, domain


class ParagraphReader(_LineReader):
    """Plain text, one document per paragraph (the ``datasets`` text builder's ``sample_by: paragraph``)."""

    def read(self) -> Record | None:
        parts: list[str] = []
        start = (self._offset, self._line, self.records)
        while True:
            raw = self._next_line()
            if not raw:
                document = "".join(parts)
                if not document:
                    return None
                return self._emit(document, start)
            line = _decode(self.path, self._line, raw)
            if "\r\n" in line:
                line = line.replace("\r\n", "\n")
            if line == "\n" and parts and parts[-1].endswith("\n"):
                document = "".join(parts)[:-1]  # the "\n\n" between paragraphs belongs to neither
                parts.clear()
                if document:
                    return self._emit(document, start)
                start = (self._offset, self._line, self.records)
                continue
            if not parts:
                start = (self._offset - len(raw), self._line - 1, self.records)
            parts.append(line)

    def _emit(self, document: str, start: tuple[int, int, int]) -> Record:
        self._start = start
        self.records += 1
        return document, None


class ParquetReader:
    """Row group by row group, the text column (and the domain column) only."""

    def __init__(self, path: Path, text_field: str, domain_field: str | None = None) -> None:
        import pyarrow.parquet as pq

        from olm_cli.data.shards import one_line

        self.path = Path(path)
        self.text_field = text_field
        self.domain_field = domain_field
        try:
            self._file = pq.ParquetFile(self.path)
        except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
            raise BadRecord(f"{self.path}: not a readable parquet file ({one_line(exc)})") from None
        self._rows_total = max(1, int(self._file.metadata.num_rows))
        self._size = os.path.getsize(self.path)
        self._group = 0
        self._row = 0
        self._texts: list[Any] | None = None
        self._domains: list[Any] | None = None
        self.records = 0
        self._start = (0, 0, 0)

    def _load_group(self) -> bool:
        from olm_cli.data.shards import one_line

        if self._group >= self._file.num_row_groups:
            return False
        columns = [self.text_field] + ([self.domain_field] if self.domain_field else [])
        try:
            table = self._file.read_row_group(self._group, columns=columns)
        except Exception as exc:  # decompression, thrift and arrow errors alike
            raise BadRecord(f"{self.path}: row group {self._group} is unreadable ({one_line(exc)})") from None
        self._texts = table.column(self.text_field).to_pylist()
        self._domains = table.column(self.domain_field).to_pylist() if self.domain_field else None
        return True

    def read(self) -> Record | None:
        while True:
            if self._texts is None and not self._load_group():
                return None
            assert self._texts is not None
            if self._row < len(self._texts):
                break
            self._group, self._row, self._texts = self._group + 1, 0, None
        text = self._texts[self._row]
        self._start = (self._group, self._row, self.records)
        self._row += 1
        self.records += 1
        where = f"{self.path}: row group {self._group} row {self._row - 1}"
        if not isinstance(text, str):
            raise BadRecord(f"{where}: {self.text_field!r} is not text (data.text_field)")
        domain = None
        if self._domains is not None:
            domain = self._domains[self._row - 1]
            if not isinstance(domain, str) or not domain:
                raise BadRecord(f"{where}: no string {self.domain_field!r} (data.domain_field)")
        return text, domain

    def position(self) -> dict[str, Any]:
        return {"row_group": self._group, "row": self._row, "records": self.records}

    def record_start(self) -> dict[str, Any]:
        group, row, records = self._start
        return {"row_group": group, "row": row, "records": records}

    def seek(self, position: dict[str, Any]) -> None:
        self._group, self._row, self.records = int(position["row_group"]), int(position["row"]), int(position["records"])
        self._texts = self._domains = None

    def skip_records(self, count: int) -> None:
        while self.records < count and self.read() is not None:
            pass

    def bytes_done(self) -> int:
        return self._size * self.records // self._rows_total

    def close(self) -> None:
        self._file.close()


def load_streaming(path: Path, fmt: str) -> Any:
    """A ``datasets`` streaming split for a dataset source (or, for tokenizer training, a file)."""
    from datasets import load_dataset

    from olm_cli.data.shards import DATASET_PREFIX, is_dataset_source
    from olm_cli.errors import DataError

    if is_dataset_source(path):
        name, _, split = str(path)[len(DATASET_PREFIX) :].rpartition("#")
        try:
            return load_dataset(name, split=split, streaming=True)
        except Exception as exc:  # datasets raises many types for a missing/unreachable dataset
            raise DataError(f"data.dataset={name!r}: cannot stream split {split!r} ({exc})") from None
    builder = {"jsonl": "json", "parquet": "parquet", "txt": "text"}[fmt]
    kwargs: dict[str, Any] = {"sample_by": "paragraph"} if fmt == "txt" else {}
    return load_dataset(builder, data_files=[str(path)], split="train", streaming=True, **kwargs)


class DatasetReader:
    """A hub dataset or dataset directory, streamed with ``datasets`` (endless, no byte size)."""

    def __init__(self, path: Path, text_field: str, domain_field: str | None = None) -> None:
        self.path = Path(path)
        self.text_field = text_field
        self.domain_field = domain_field
        self._dataset = load_streaming(self.path, "dataset")
        self._iterator = iter(self._dataset)
        # datasets resets an iterator's reported state until it yields again; until then the
        # position is the one we loaded (a checkpoint taken right after a resume needs it).
        self._loaded: dict[str, Any] | None = None
        self.records = 0
        self._start: dict[str, Any] = self.position()

    def read(self) -> Record | None:
        from olm_cli.data.shards import one_line
        from olm_cli.errors import DataError

        start = self.position()
        try:
            record = next(self._iterator)
        except StopIteration:
            return None
        except Exception as exc:  # datasets wraps parser errors in many types
            raise DataError(f"{self.path}: failed while streaming ({one_line(exc)})") from None
        self._loaded = None
        self._start = start
        self.records += 1
        text = record.get(self.text_field)
        if not isinstance(text, str):
            raise BadRecord(f"{self.path}: record {self.records} has no string field {self.text_field!r} (data.text_field)")
        domain = None
        if self.domain_field is not None:
            domain = record.get(self.domain_field)
            if not isinstance(domain, str) or not domain:
                raise BadRecord(f"{self.path}: record {self.records} has no string field {self.domain_field!r} "
                                "(data.domain_field)")
        return text, domain

    def position(self) -> dict[str, Any]:
        state = self._loaded if self._loaded is not None else self._dataset.state_dict()
        return {"dataset_state": state, "records": self.records}

    def record_start(self) -> dict[str, Any]:
        return self._start

    def seek(self, position: dict[str, Any]) -> None:
        self._dataset.load_state_dict(position["dataset_state"])
        self._iterator = iter(self._dataset)
        self._loaded = position["dataset_state"]
        self.records = int(position["records"])

    def skip_records(self, count: int) -> None:
        while self.records < count and self.read() is not None:
            pass

    def bytes_done(self) -> int:
        return 0

    def close(self) -> None:
        self._dataset = self._iterator = None
