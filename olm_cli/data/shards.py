"""Which files are shards, what format they are in, which domain they belong to, and the cheap
up-front check that keeps an obviously broken file out of an increment.

* :func:`discover_shards` expands the recipe's files/directories/globs (re-run on every
  invocation, so new shards are picked up). A pattern that matches nothing is a recipe error
  (a typo or an unmounted disk must not look like a quiet night), and matches that are not
  regular files (FIFOs, devices, symlink loops) are returned too, so the ledger quarantines them
  with a reason instead of dropping them unseen.
* :func:`check_shard` is the planning-time check: it costs a few kilobytes per shard (the head of
  a text shard, the footer of a parquet file), never a full read. Everything past the head is
  validated while it is read for training (see :mod:`olm_cli.data.reader`): a bad record there
  quarantines the rest of its shard and the records before it stay trained.
* :func:`validate_shard` reads a whole file; it is for single files read outside training
  (held-out evaluation sets), where failing before any work is cheap.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from olm_cli.errors import DataError, RecipeError
from olm_cli.rundir.ledger import file_kind_problem, shard_key

DATASET_PREFIX = "dataset:"
SHARD_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz", ".json.gz", ".txt.gz")
# The planning check parses the records that start in this many bytes of a text shard.
HEAD_CHECK_BYTES = 64 * 1024


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


def dataset_source(name: str, split: str) -> Path:
    """The pseudo-shard that stands for a whole streamed dataset (hub id or local directory)."""
    return Path(f"{DATASET_PREFIX}{name}#{split}")


def is_dataset_source(path: Path | str) -> bool:
    return str(path).startswith(DATASET_PREFIX)


def require_regular_file(path: Path) -> None:
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


def one_line(exc: BaseException) -> str:
    """pyarrow's messages span lines; a quarantine reason is one line of the nightly log."""
    return " ".join(str(exc).split())


def check_shard(path: Path, fmt: str, text_field: str) -> None:
    """The cheap planning check: raise :class:`DataError` for a shard that cannot be trained at all.

    Text shards: readable, not empty, and every record that starts in the first
    :data:`HEAD_CHECK_BYTES` parses (a binary file or the wrong ``data.text_field`` shows there).
    Parquet: the footer, the schema and the text column's type (no row group is read). Records
    further in are checked as training reads them.
    """
    from olm_cli.data.reader import BadRecord, open_reader

    require_regular_file(path)
    if fmt == "parquet":
        _check_parquet_footer(path, text_field)
        return
    try:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path}: empty shard (no documents)")
        reader = open_reader(path, fmt, text_field)
        try:
            documents = 0
            while reader.bytes_done() < HEAD_CHECK_BYTES and reader.read() is not None:
                documents += 1
        finally:
            reader.close()
    except BadRecord as exc:
        raise DataError(str(exc)) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read shard ({exc})") from None
    if documents == 0:
        raise DataError(f"{path}: empty shard (no documents)")


def _check_parquet_footer(path: Path, text_field: str) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"{path}: not a readable parquet file ({one_line(exc)})") from None
    with parquet:
        names = parquet.schema_arrow.names
        if text_field not in names:
            raise DataError(f"{path}: no column {text_field!r} (data.text_field); columns: {', '.join(names)}")
        column_type = parquet.schema_arrow.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise DataError(f"{path}: column {text_field!r} is {column_type}, not text (data.text_field)")
        rows = int(parquet.metadata.num_rows)
    if rows == 0:
        raise DataError(f"{path}: empty shard (0 rows)")
    return rows


def validate_shard(path: Path, fmt: str, text_field: str) -> int:
    """Read the whole file once; return its document count or raise :class:`DataError`.

    For single files read outside training (evaluation sets): the message names the file and
    the first bad line (or row group), which is what an operator needs to fix it.
    """
    from olm_cli.data.reader import BadRecord, open_reader

    require_regular_file(path)
    if fmt == "parquet":
        _check_parquet_footer(path, text_field)
    documents = 0
    try:
        reader = open_reader(path, fmt, text_field)
        try:
            while reader.read() is not None:
                documents += 1
        finally:
            reader.close()
    except BadRecord as exc:
        raise DataError(str(exc)) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read shard ({exc})") from None
    if documents == 0:
        raise DataError(f"{path}: empty shard (no documents)")
    return documents
