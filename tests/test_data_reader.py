"""The local shard readers, batched tokenisation, packing across shards and the schedule estimate."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DOMAIN_PATTERN, make_documents, write_jsonl

from olm_cli.data import BlockStream, open_reader
from olm_cli.data.reader import BadRecord

TRICKY_TXT = "\n\nfirst para\nstill first\n\n\nsecond\r\nline two\r\n\r\n \n\nthird\n\n\n\nlast\n"



def _all(reader) -> list[str]:
    texts = []
    while (record := reader.read()) is not None:
        texts.append(record[0])
    return texts


def test_txt_paragraphs_are_the_documents_datasets_made(tmp_path: Path) -> None:
    from datasets import load_dataset

    path = tmp_path / "a.txt"
    path.write_bytes(TRICKY_TXT.encode())
    expected = [row["text"] for row in load_dataset("text", data_files=[str(path)], split="train", streaming=True,
                                                    sample_by="paragraph")]
    assert _all(open_reader(path, "txt", "text")) == expected


@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz", "a.txt", "a.txt.gz"])
def test_resume_at_every_record_by_position(tmp_path: Path, name: str) -> None:
    texts = make_documents("alpha", 12, 3)
    path = tmp_path / name
    fmt = "txt" if ".txt" in name else "jsonl"
    body = "\n\n".join(texts) if fmt == "txt" else "".join(json.dumps({"text": t}) + "\n\n" for t in texts)
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        handle.write(body)
    assert _all(open_reader(path, fmt, "text")) == texts
    for cut in range(len(texts) + 1):
        reader = open_reader(path, fmt, "text")
        for _ in range(cut):
            reader.read()
        position = json.loads(json.dumps(reader.position()))
        again = open_reader(path, fmt, "text")
        again.seek(position)
        assert _all(again) == texts[cut:], f"resume after record {cut}"


def test_parquet_resumes_by_row_group_and_row(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"row {i}" for i in range(25)]
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=7)
    for cut in range(len(texts) + 1):
        reader = open_reader(path, "parquet", "text")
        for _ in range(cut):
            reader.read()
        again = open_reader(path, "parquet", "text")
        again.seek(json.loads(json.dumps(reader.position())))
        assert _all(again) == texts[cut:]


def test_a_bad_line_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n', encoding="utf-8")
    reader = open_reader(path, "jsonl", "text")
    assert reader.read() == ("ok", None)
    with pytest.raises(BadRecord, match=rf"^{path}:3: malformed JSON"):
        reader.read()


def test_batched_tokenisation_gives_the_per_document_tokens(tmp_path: Path, tokenizer) -> None:
    texts = make_documents("alpha", 50, 4) + make_documents("beta", 50, 4)
    shard = write_jsonl(tmp_path / "00-alpha" / "a.jsonl", texts)
    expected = [t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    for batch in (1, 7, 64):
        stream = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, min_block_tokens=1,
                             batch_documents=batch)
        assert np.concatenate([b.tokens for b in stream.take(10**6)]).tolist() == expected


def test_blocks_cross_shards_and_every_token_is_attributed_to_its_shard(tmp_path: Path, tokenizer) -> None:
    shards = [write_jsonl(tmp_path / "00-alpha" / f"s{i}.jsonl", make_documents("alpha", 1 + i % 3, i)) for i in range(9)]
    stream = BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, min_block_tokens=1)
    finished: list[str] = []
    counted: dict[str, int] = {}
    seen: set[str] = set()
    while blocks := stream.take(3):
        for block in blocks:
            assert sum(n for _, n in block.token_spans()) == len(block) and block.shard == block.token_spans()[0][0]
            for shard, n in block.token_spans():
                counted[shard] = counted.get(shard, 0) + n
                seen.add(shard)
        for shard in stream.take_finished_shards():
            # Finished only once the block holding its last token has been handed out.
            assert shard in seen and shard not in finished
            finished.append(shard)
    assert sorted(finished) == sorted(str(s) for s in shards)
    assert all(len(b) == 16 for b in BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN).take(10**6)[:-1])
    for i, shard in enumerate(shards):
        texts = make_documents("alpha", 1 + i % 3, i)
        assert counted[str(shard)] == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in texts)


def test_cross_shard_stream_resumes_bit_identically_at_every_block(tmp_path: Path, tokenizer) -> None:
    shards = [write_jsonl(tmp_path / "00-alpha" / f"s{i}.jsonl", make_documents("alpha", 2, i)) for i in range(6)]
    options = {"block_size": 16, "domain_pattern": DOMAIN_PATTERN, "batch_documents": 3}
    reference = [(b.tokens.tolist(), b.token_spans()) for b in BlockStream(shards, tokenizer, **options).take(10**6)]
    for cut in range(len(reference)):
        first = BlockStream(shards, tokenizer, **options)
        head = [(b.tokens.tolist(), b.token_spans()) for b in first.take(cut)]
        state = json.loads(json.dumps(first.state_dict()))
        assert len(json.dumps(state)) < 4_000  # a position, not documents
        second = BlockStream(shards, tokenizer, **options)
        second.load_state_dict(state)
        assert head + [(b.tokens.tolist(), b.token_spans()) for b in second.take(10**6)] == reference


def test_a_bad_record_quarantines_the_rest_of_its_shard(tmp_path: Path, tokenizer) -> None:
    good = make_documents("alpha", 4, 1)
    shard = tmp_path / "00-alpha" / "bad.jsonl"
    write_jsonl(shard, good)
    with open(shard, "a", encoding="utf-8") as handle:
        handle.write('{"text": oops\n' + json.dumps({"text": "never read"}) + "\n")
    warnings: list[str] = []
    stream = BlockStream([shard], tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, min_block_tokens=1,
                         bad_records="quarantine", warn=warnings.append)
    tokens = np.concatenate([b.tokens for b in stream.take(10**6)]).tolist()
    assert len(tokens) == sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in good)
    assert stream.take_finished_shards() == [str(shard)]
    assert stream.shard_problem(str(shard)) == f"{shard}:5: malformed JSON (Expecting value)"
    assert warnings == [f"{shard}:5: malformed JSON (Expecting value); the rest of the shard is quarantined "
                        "(the 4 records before it are trained)"]


def test_the_block_estimate_is_exact_once_read_and_close_before(tmp_path: Path, tokenizer) -> None:
    shards = [write_jsonl(tmp_path / "00-alpha" / f"s{i}.jsonl", make_documents("alpha", 20, i)) for i in range(20)]
    stream = BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN, batch_documents=16)
    total = len(BlockStream(shards, tokenizer, block_size=16, domain_pattern=DOMAIN_PATTERN).take(10**7))
    first = stream.remaining_blocks_estimate()
    assert first is not None and abs(first - total) / total < 0.1, (first, total)
    taken = 0
    while blocks := stream.take(50):
        taken += len(blocks)
        estimate = stream.remaining_blocks_estimate()
        assert estimate is not None and abs(taken + estimate - total) / total < 0.1
    assert stream.remaining_blocks_estimate() == 0
