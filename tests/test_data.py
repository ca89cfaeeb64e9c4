from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_documents, write_jsonl

from olm_cli.data import BlockStream, discover_shards, domain_of, read_blocks, validate_shard
from olm_cli.errors import DataError
from olm_cli.modeling import train_tokenizer

PATTERN = r"(?:\d+-)?(?P<domain>[^/\\]+)[/\\][^/\\]+$"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tok")
    shard = write_jsonl(root / "t.jsonl", make_documents("alpha", 40, 0) + make_documents("beta", 40, 0))
    return train_tokenizer([shard], "text", vocab_size=320, limit_chars=100_000)


def test_discover_globs_dirs_and_missing(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "d" / "00-x" / "a.jsonl", ["one"])
    b = write_jsonl(tmp_path / "d" / "01-y" / "b.jsonl", ["two"])
    (tmp_path / "d" / "notes.md").write_text("ignored")
    assert discover_shards([str(tmp_path / "d")]) == [a.resolve(), b.resolve()]
    assert discover_shards([str(tmp_path / "d" / "*" / "*.jsonl"), str(a)]) == [a.resolve(), b.resolve()]
    with pytest.raises(DataError, match="no such shard"):
        discover_shards([str(tmp_path / "missing.jsonl")])


def test_domain_from_path() -> None:
    assert domain_of("/data/stream/00-code/shard-001.jsonl", PATTERN) == "code"
    assert domain_of("/data/stream/prose/s.jsonl", PATTERN) == "prose"


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


def test_packing_joins_documents_with_eos_and_never_crosses_shards(tmp_path: Path, tokenizer) -> None:
    a = write_jsonl(tmp_path / "00-alpha" / "a.jsonl", make_documents("alpha", 6, 1))
    b = write_jsonl(tmp_path / "01-beta" / "b.jsonl", make_documents("beta", 6, 1))
    stream = BlockStream([a, b], tokenizer, block_size=16, domain_pattern=PATTERN, min_block_tokens=2)
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
    assert got == expected[: len(got)] and len(expected) - len(got) < 2
    assert stream.take_finished_shards() == [str(a), str(b)]


def test_stream_resumes_exactly_from_state(tmp_path: Path, tokenizer) -> None:
    shards = [write_jsonl(tmp_path / "00-alpha" / f"s{i}.jsonl", make_documents("alpha", 30, i)) for i in range(3)]
    full = BlockStream(shards, tokenizer, block_size=16, domain_pattern=PATTERN)
    reference = [blk.tokens.tolist() for blk in full.take(10_000)]
    for cut in (1, 7, len(reference) // 2, len(reference) - 1):
        first = BlockStream(shards, tokenizer, block_size=16, domain_pattern=PATTERN)
        head = [blk.tokens.tolist() for blk in first.take(cut)]
        state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
        second = BlockStream(shards, tokenizer, block_size=16, domain_pattern=PATTERN)
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
    full = BlockStream([shard], tokenizer, block_size=16, domain_pattern=PATTERN)
    reference = [blk.tokens.tolist() for blk in full.take(100_000)]
    first = BlockStream([shard], tokenizer, block_size=16, domain_pattern=PATTERN)
    head = [blk.tokens.tolist() for blk in first.take(len(reference) // 2)]
    state = json.loads(json.dumps(first.state_dict()))
    second = BlockStream([shard], tokenizer, block_size=16, domain_pattern=PATTERN)
    second.load_state_dict(state)
    again = json.loads(json.dumps(second.state_dict()))  # before reading anything
    assert again == state
    third = BlockStream([shard], tokenizer, block_size=16, domain_pattern=PATTERN)
    third.load_state_dict(again)
    assert head + [blk.tokens.tolist() for blk in third.take(100_000)] == reference
