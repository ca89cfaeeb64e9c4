from __future__ import annotations

import gzip
import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DOMAIN_PATTERN, make_documents, write_jsonl

from olm_cli.data import BlockStream, discover_shards, domain_of, read_blocks, validate_shard
from olm_cli.errors import DataError, RecipeError


def test_discover_globs_dirs_and_missing(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "d" / "00-x" / "a.jsonl", ["one"])
    b = write_jsonl(tmp_path / "d" / "01-y" / "b.jsonl", ["two"])
    (tmp_path / "d" / "notes.md").write_text("ignored")
    assert discover_shards([str(tmp_path / "d")]) == [a.resolve(), b.resolve()]
    assert discover_shards([str(tmp_path / "d" / "*" / "*.jsonl"), str(a)]) == [a.resolve(), b.resolve()]
    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(RecipeError, match=re.escape(f"data.shards[1]: '{missing}' matches no file")):
        discover_shards([str(a), missing])
    assert discover_shards([str(a), missing], allow_empty=True) == [a.resolve()]


def test_domain_from_path() -> None:
    assert domain_of("/data/stream/00-code/shard-001.jsonl", DOMAIN_PATTERN) == "code"
    assert domain_of("/data/stream/prose/s.jsonl", DOMAIN_PATTERN) == "prose"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty shard"),
        (b'{"text": "ok"}\n{"text": broken\n', r":2: malformed JSON"),
        (b'{"text": "ok"}\n{"body": "x"}\n', r":2: record has no string field 'text'"),
        (b'{"text": "caf\xe9"}\n', r":1: not UTF-8"),
        (b"\x00\x01\x02binary", "binary data"),
    ],
)
def test_validate_rejects_bad_shards_naming_the_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        validate_shard(path, "jsonl", "text")


def test_validate_accepts_gzip_txt_and_parquet(tmp_path: Path) -> None:
    gz = tmp_path / "a.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"text": "hello"}) + "\n")
    assert validate_shard(gz, "jsonl", "text") == 1
    txt = tmp_path / "b.txt"
    txt.write_text("para one\n\npara two\n", encoding="utf-8")
    assert validate_shard(txt, "txt", "text") == 2
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x", "y", "z"]}), tmp_path / "c.parquet")
    assert validate_shard(tmp_path / "c.parquet", "parquet", "text") == 3
    with pytest.raises(DataError, match="no column 'body'"):
        validate_shard(tmp_path / "c.parquet", "parquet", "body")


def test_packing_joins_documents_with_eos_and_never_mixes_domains(tmp_path: Path, tokenizer) -> None:
    a = write_jsonl(tmp_path / "00-alpha" / "a.jsonl", make_documents("alpha", 6, 1))
    b = write_jsonl(tmp_path / "01-beta" / "b.jsonl", make_documents("beta", 6, 1))
    stream = BlockStream([a, b], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, min_block_tokens=2)
    blocks = stream.take(10_000)
    assert stream.exhausted
    assert all(len(blk) <= 16 for blk in blocks)
    assert {blk.domain for blk in blocks if blk.shard == str(a)} == {"alpha"}
    assert {blk.domain for blk in blocks if blk.shard == str(b)} == {"beta"}
    # every document of shard a, tokenized and EOS-joined, equals the concatenated blocks of a
    expected: list[int] = []
    for text in make_documents("alpha", 6, 1):
        expected += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    got = np.concatenate([blk.tokens for blk in blocks if blk.shard == str(a)]).tolist()
    assert got == expected
    assert sorted(stream.take_finished_shards()) == sorted([str(a), str(b)])


def test_stream_resumes_exactly_from_state(tmp_path: Path, tokenizer) -> None:
    shards = [write_jsonl(tmp_path / "00-alpha" / f"s{i}.jsonl", make_documents("alpha", 30, i)) for i in range(3)]
    full = BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
    reference = [blk.tokens.tolist() for blk in full.take(10_000)]
    for cut in (1, 7, len(reference) // 2, len(reference) - 1):
        first = BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
        head = [blk.tokens.tolist() for blk in first.take(cut)]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        second = BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
        second.load_state_dict(state)
        tail = [blk.tokens.tolist() for blk in second.take(10_000)]
        assert head + tail == reference, f"resume at block {cut} diverged"


def test_read_blocks_caps_tokens(tmp_path: Path, tokenizer) -> None:
    path = write_jsonl(tmp_path / "eval.jsonl", make_documents("gamma", 50, 3))
    blocks = read_blocks(path, tokenizer, block_size=16, max_tokens=100, domain="gamma")
    assert 100 <= sum(len(b) for b in blocks) < 100 + 16 * 16
    assert {b.domain for b in blocks} == {"gamma"}


def test_state_taken_right_after_a_resume_keeps_the_position(tmp_path: Path, tokenizer) -> None:
    # A checkpoint can be written before the resumed reader yields again (blocks were pending);
    # its position must still be the resumed one, not the start of the shard.
    shard = write_jsonl(tmp_path / "00-alpha" / "s.jsonl", make_documents("alpha", 200, 5))
    full = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
    reference = [blk.tokens.tolist() for blk in full.take(100_000)]
    first = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
    head = [blk.tokens.tolist() for blk in first.take(len(reference) // 2)]
    state = json.loads(json.dumps(first.state_dict()))
    second = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
    second.load_state_dict(state)
    again = json.loads(json.dumps(second.state_dict()))  # before reading anything
    assert again == state
    third = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
    third.load_state_dict(again)
    assert head + [blk.tokens.tolist() for blk in third.take(100_000)] == reference


# --------------------------------------------------------------------------- long documents


def _one_document_shard(path: Path, words: int, seed: int = 7) -> tuple[Path, str]:
    import random

    rng = random.Random(seed)
    vocabulary = "the river runs past the old mill and the miller sings of bread flour wheat".split()
    text = " ".join(rng.choice(vocabulary) for _ in range(words))
    return write_jsonl(path, [text]), text


def _reference_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_packer_is_linear_and_cuts_the_same_blocks_as_one_push() -> None:
    from olm_cli.data import _Packer

    ids = list(range(1, 2_000_001))
    packer = _Packer(block_size=256, eos_id=0)
    started = time.perf_counter()
    blocks = packer.push("d", ids)
    seconds = time.perf_counter() - started
    assert seconds < 3, f"packing 2M tokens took {seconds:.1f} s (the quadratic version took ~38 s)"
    assert len(blocks) == (len(ids) + 1) // 256
    assert np.concatenate([b.tokens for b in blocks]).tolist() == (ids + [0])[: len(blocks) * 256]
    # The same document in uneven pushes gives the same blocks and the same carry.
    pieces = _Packer(block_size=256, eos_id=0)
    cut = [b for start in range(0, len(ids), 77_777)
           for b in pieces.push("d", ids[start : start + 77_777], end_of_document=start + 77_777 >= len(ids))]
    assert [b.tokens.tolist() for b in cut] == [b.tokens.tolist() for b in blocks]
    assert pieces.carry == packer.carry


def test_chunk_end_cuts_before_whitespace_and_tokens_match(tokenizer) -> None:
    from olm_cli.data import chunk_end

    text = " ".join(make_documents("alpha", 200, 3))
    end = chunk_end(text, 0, 1000)
    assert 900 < end <= 1000 and text[end] in " \n"
    assert chunk_end("x" * 50, 10, 1000) == 50
    assert chunk_end("x" * 5000, 0, 1000) == 1000  # no whitespace: cut at the size
    chunked: list[int] = []
    start = 0
    while start < len(text):
        end = chunk_end(text, start, 1000)
        chunked += _reference_ids(tokenizer, text[start:end])
        start = end
    assert chunked == _reference_ids(tokenizer, text)


def test_long_document_is_tokenised_in_chunks_with_the_same_blocks(tmp_path: Path, tokenizer) -> None:
    shard, text = _one_document_shard(tmp_path / "00-alpha" / "big.jsonl", 20_000)
    whole = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, chunk_chars=10**9)
    chunked = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, chunk_chars=5_000)
    expected = [b.tokens.tolist() for b in whole.take(10**6)]
    first = chunked.take(3)
    # One refill tokenised one chunk, not the whole 100 kB record.
    assert chunked._document is not None and chunked._document.offset <= 5_000
    assert [b.tokens.tolist() for b in first + chunked.take(10**6)] == expected
    assert np.concatenate(expected).tolist()[:-1] == _reference_ids(tokenizer, text)[: sum(map(len, expected)) - 1]
    assert chunked.long_document_counts(str(shard)) == {"split": 0, "skipped": 0}


def test_resume_in_the_middle_of_a_long_document(tmp_path: Path, tokenizer) -> None:
    shard, _ = _one_document_shard(tmp_path / "00-alpha" / "big.jsonl", 20_000)
    short = write_jsonl(tmp_path / "00-alpha" / "small.jsonl", make_documents("alpha", 5, 1))
    options = {"block_size": 16, "domain_pattern": DOMAIN_PATTERN, "chunk_chars": 3_000, "max_document_tokens": 2_000}
    reference = [b.tokens.tolist() for b in BlockStream([short, shard], tokenizer, **options).take(10**6)]
    for cut in (40, 700, len(reference) - 3):
        first = BlockStream([short, shard], tokenizer, **options)
        head = [b.tokens.tolist() for b in first.take(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        assert len(json.dumps(state)) < 200_000  # the position, not the rest of the text
        second = BlockStream([short, shard], tokenizer, **options)
        second.load_state_dict(state)
        assert json.loads(json.dumps(second.state_dict())) == state
        assert head + [b.tokens.tolist() for b in second.take(10**6)] == reference, f"diverged at block {cut}"


def test_document_over_the_cap_is_split_into_eos_terminated_pieces(tmp_path: Path, tokenizer) -> None:
    shard, text = _one_document_shard(tmp_path / "00-alpha" / "big.jsonl", 3_000)
    warnings: list[str] = []
    stream = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, min_block_tokens=1,
                         max_document_tokens=500, chunk_chars=700, warn=warnings.append)
    tokens = np.concatenate([b.tokens for b in stream.take(10**6)]).tolist()
    ids = _reference_ids(tokenizer, text)
    eos = tokenizer.eos_token_id
    pieces = [ids[i : i + 500] for i in range(0, len(ids), 500)]
    assert tokens == [t for piece in pieces for t in piece + [eos]]
    assert stream.long_document_counts(str(shard)) == {"split": 1, "skipped": 0}
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{shard}: record 1 ({len(text):,} characters) has more than "
                                  "data.max_document_tokens=500 tokens; split")


def test_document_over_the_cap_is_skipped_and_counted(tmp_path: Path, tokenizer) -> None:
    small = make_documents("alpha", 3, 2)
    _, big = _one_document_shard(tmp_path / "unused.jsonl", 3_000)
    shard = write_jsonl(tmp_path / "00-alpha" / "mixed.jsonl", [small[0], big, small[1]])
    warnings: list[str] = []
    stream = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, min_block_tokens=1,
                         max_document_tokens=500, long_documents="skip", chunk_chars=700, warn=warnings.append)
    tokens = np.concatenate([b.tokens for b in stream.take(10**6)]).tolist()
    eos = tokenizer.eos_token_id
    assert tokens == _reference_ids(tokenizer, small[0]) + [eos] + _reference_ids(tokenizer, small[1]) + [eos]
    assert stream.long_document_counts(str(shard)) == {"split": 0, "skipped": 1}
    assert len(warnings) == 1 and f"{shard}: record 2 (" in warnings[0] and warnings[0].endswith("skipped (data.long_documents: skip)")


# --------------------------------------------------------------------------- what discovery returns


def test_discover_keeps_fifos_devices_and_loops_for_the_ledger(tmp_path: Path) -> None:
    folder = tmp_path / "d" / "00-x"
    good = write_jsonl(folder / "a.jsonl", ["one"])
    os.mkfifo(folder / "pipe.jsonl")
    (folder / "zero.jsonl").symlink_to("/dev/zero")
    (folder / "loop.jsonl").symlink_to(folder / "loop.jsonl")
    expected = [folder / "loop.jsonl", folder / "pipe.jsonl", folder / "zero.jsonl", good.resolve()]
    assert discover_shards([str(tmp_path / "d")]) == sorted(expected)
    assert discover_shards([str(folder / "*.jsonl")]) == sorted(expected)


def test_a_directory_without_shards_matches_no_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("not a shard")
    with pytest.raises(RecipeError, match=r"data.shards\[0\]: '.*empty' matches no file"):
        discover_shards([str(tmp_path / "empty")])
    with pytest.raises(RecipeError, match=r"replay.seed_from\[0\]"):
        discover_shards([str(tmp_path / "nothing-*.jsonl")], setting="replay.seed_from")


def test_parquet_with_a_corrupt_row_group_is_rejected(tmp_path: Path) -> None:
    path = corrupt_parquet(tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"row group 1 is unreadable"):
        validate_shard(path, "parquet", "text")


def corrupt_parquet(path: Path) -> Path:
    """Two row groups with an intact footer; the second group's data pages are overwritten."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i} " * 20 for i in range(400)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=200, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 8 : start + column.total_compressed_size] = b"\xff" * (column.total_compressed_size - 8)
    path.write_bytes(bytes(data))
    return path


def test_a_stream_refuses_a_fifo_instead_of_blocking(tmp_path: Path, tokenizer) -> None:
    fifo = tmp_path / "00-alpha" / "seed.jsonl"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    stream = BlockStream([fifo], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN)
    with pytest.raises(DataError, match=r"seed.jsonl: not a regular file \(FIFO\)"):
        stream.take(1)
