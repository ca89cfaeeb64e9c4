"""Issue 9, "never fail silently", the data side: a shard cannot hang training, content is never
trained twice, and data that is not there or not a file is said out loud. Real ``olm`` processes
where a hang or a signal is the point (each with a timeout), in-process otherwise.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import make_documents, write_jsonl
from e2e_helpers import (
    cli,
    last_step,
    latest,
    ledger,
    make_recipe,
    olm,
    reaped,
    spawn,
    trainer_state,
    wait_for,
)

# End to end (training runs and real ``olm`` processes): outside the fast loop, ``-m 'not slow'``.
pytestmark = pytest.mark.slow

DOCS = 8
# Big enough that tokenising it in one call used to take several seconds and hold every token in
# one list (the 50 MB record hung training); small enough to write in a blink.
HUGE_RECORD_CHARS = 6_000_000


def _huge_text(chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "the river runs past the old mill and the miller sings of bread flour wheat stone water".split()
    out: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(words)
        out.append(word)
        size += len(word) + 1
    return " ".join(out)


def _train(recipe: Path, *overrides: str) -> dict[str, Any]:
    result = cli("train", "--config", recipe, "--json", *overrides)
    assert result.code == 0, result.text
    outcome = result.json()
    outcome["output"] = " ".join(result.err.split())  # human messages go to stderr with --json
    return outcome


def _assert_ledger_matches_outcome(run_dir: Path, tokens: int) -> None:
    """Every token the increments report is accounted to exactly one shard."""
    assert sum(e["tokens"] for e in ledger(run_dir).values()) == tokens


def test_one_huge_record_trains_and_sigterm_is_honoured_within_seconds(tmp_path: Path, record_property: Any) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS,
                         model={"arch": {"size": "tiny", "vocab_size": 320, "hidden_size": 32,
                                         "num_hidden_layers": 2, "num_attention_heads": 2,
                                         "intermediate_size": 64, "max_position_embeddings": 128,
                                         "tokenizer_train_chars": 50_000}},
                         run={"max_steps": 100_000, "checkpoint_every": 100_000})
    huge = write_jsonl(tmp_path / "stream" / "00-alpha" / "zz-huge.jsonl", [_huge_text(HUGE_RECORD_CHARS)])
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    started = time.monotonic()
    with reaped(spawn("train", "--config", recipe, log=log)) as proc:
        # The small shard is trained first; steps past it come from the huge record.
        wait_for(lambda: last_step(run_dir) >= 40, proc, timeout=120, what="step 40")
        to_step_40 = time.monotonic() - started
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proc.wait(timeout=30)
        stop_seconds = time.monotonic() - signalled
    output = log.read_text()
    record_property("seconds_to_step_40", round(to_step_40, 1))
    record_property("seconds_to_stop_after_sigterm", round(stop_seconds, 1))
    print(f"\nhuge record: step 40 after {to_step_40:.1f} s; stopped {stop_seconds:.1f} s after SIGTERM")
    assert proc.returncode == 143, output
    assert stop_seconds < 15, f"took {stop_seconds:.1f} s to stop after SIGTERM"
    assert to_step_40 < 90, f"{to_step_40:.0f} s to step 40: the huge record is not streamed at the normal rate"
    assert "stopped by signal" in output, output

    state = trainer_state(latest(run_dir))
    document = state["stream"]["unit"]["document"]
    # The checkpoint stores where it was inside the record (the chunk being packed and how many
    # of its blocks were handed out), not the rest of its text.
    assert document is not None and document["offset"] < HUGE_RECORD_CHARS and state["stream"]["handed_out"] > 0
    assert (latest(run_dir) / "trainer_state.json").stat().st_size < 2_000_000
    entries = {Path(e["path"]).name: e for e in state["ledger"]["shards"]}
    assert entries["zz-huge.jsonl"]["status"] == "in_progress"
    assert entries["shard-000.jsonl"]["status"] == "done"
    assert entries["zz-huge.jsonl"]["path"] == str(huge.resolve())
    assert (run_dir / ".lock").read_text() == ""


def test_edited_shard_whose_bytes_come_back_under_a_new_name_is_not_trained_again(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    run_dir = tmp_path / "run"
    folder = tmp_path / "stream" / "00-alpha"
    original = folder / "shard-000.jsonl"
    trained_bytes = original.read_bytes()
    first = _train(recipe)
    assert first["status"] == "increment_complete"

    # Edited in place, then the original bytes re-appear under another name.
    write_jsonl(original, make_documents("alpha", DOCS + 2, 99))
    restored = folder / "shard-000-restored.jsonl"
    restored.write_bytes(trained_bytes)
    second = _train(recipe, "run.retrain_changed=true")

    assert second["status"] == "increment_complete"  # the edited file is new content: trained
    entries = ledger(run_dir)
    copy = entries["00-alpha/shard-000-restored.jsonl"]
    assert copy["status"] == "skipped" and copy["tokens"] == 0
    assert copy["reason"].startswith(f"same content as {original.resolve()}, already trained")
    assert f"skipped: {restored.resolve()}: same content as {original.resolve()}, already trained" in second["output"]
    _assert_ledger_matches_outcome(run_dir, first["tokens"] + second["tokens"])

    # And changing the edited file back to the trained bytes does not train them a third time.
    original.write_bytes(trained_bytes)
    os.utime(original, ns=(time.time_ns(), time.time_ns()))
    third = _train(recipe, "run.retrain_changed=true")
    assert third["status"] == "nothing_to_do"
    assert ledger(run_dir)["00-alpha/shard-000.jsonl"]["status"] == "skipped"
    _assert_ledger_matches_outcome(run_dir, first["tokens"] + second["tokens"])


def test_fifo_and_dev_zero_link_are_quarantined_and_the_rest_trains(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS)
    folder = tmp_path / "stream" / "00-alpha"
    fifo = folder / "pipe.jsonl"
    os.mkfifo(fifo)  # nobody writes to it: opening it for reading blocks forever
    zero = folder / "zero.jsonl"
    zero.symlink_to("/dev/zero")  # reading it never ends
    loop = folder / "loop.jsonl"
    loop.symlink_to(loop)
    run_dir = tmp_path / "run"

    result = olm("train", "--config", recipe, timeout=180)  # a hang fails here, not forever

    assert result.code == 0, result.text
    assert result.has(f"quarantined: {fifo}: not a regular file (FIFO)"), result.text
    assert result.has(f"quarantined: {zero}: not a regular file (character device)"), result.text
    assert result.has(f"quarantined: {loop}: symlink loop"), result.text
    entries = ledger(run_dir)
    assert {name: e["status"] for name, e in entries.items()} == {
        "00-alpha/loop.jsonl": "quarantined",
        "00-alpha/pipe.jsonl": "quarantined",
        "00-alpha/shard-000.jsonl": "done",
        "00-alpha/zero.jsonl": "quarantined",
    }
    assert all(e["tokens"] == 0 and e["sha256"] == "" for n, e in entries.items() if n != "00-alpha/shard-000.jsonl")
    assert entries["00-alpha/shard-000.jsonl"]["tokens"] > 0
    # Quarantined once; the next night has nothing to do and does not hang either.
    again = olm("train", "--config", recipe, "--json", timeout=120)
    assert again.code == 0 and again.json()["status"] == "nothing_to_do", again.text


def test_a_shards_pattern_matching_no_file_exits_2_naming_it(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[], docs=DOCS)
    pattern = str(tmp_path / "stream" / "*" / "*.jsonl")

    result = cli("train", "--config", recipe)

    assert result.code == 2, result.text
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert lines == [f"error: data.shards[0]: '{pattern}' matches no file"], result.text
    assert not (tmp_path / "run" / "ledger.json").exists()

    # An empty folder is as empty as a missing one; allow_empty makes it a quiet night again.
    (tmp_path / "stream" / "00-alpha").mkdir(parents=True)
    assert cli("train", "--config", recipe).code == 2
    quiet = cli("train", "--config", recipe, "--json", "data.allow_empty=true")
    assert quiet.code == 0 and quiet.json()["status"] == "nothing_to_do", quiet.text


def test_parquet_shard_with_a_corrupt_row_group_is_quarantined_where_training_reads_it(tmp_path: Path) -> None:
    """Row groups are checked as they are read (no full read at planning): the group before the
    corrupt one trains and is counted, the rest of the shard is quarantined with the reason."""
    from test_data import corrupt_parquet

    recipe = make_recipe(tmp_path, shards=[("alpha", 0)], docs=DOCS,
                         data={"shards": [str(tmp_path / "stream" / "*" / "*")], "block_size": 32})
    bad = corrupt_parquet(tmp_path / "stream" / "00-alpha" / "broken.parquet")
    run_dir = tmp_path / "run"

    outcome = _train(recipe)

    assert outcome["status"] == "increment_complete"
    entry = ledger(run_dir)["00-alpha/broken.parquet"]
    assert entry["status"] == "quarantined" and entry["tokens"] > 0  # row group 0 trained
    assert entry["reason"].startswith(f"{bad.resolve()}: row group 1 is unreadable")
    assert "\n" not in entry["reason"]
    assert (f"warning: {entry['reason']}; the rest of the shard is quarantined (the 200 records before it are "
            "trained)") in outcome["output"]
    assert ledger(run_dir)["00-alpha/shard-000.jsonl"]["status"] == "done"
    _assert_ledger_matches_outcome(run_dir, outcome["tokens"])


def test_a_huge_record_is_tokenised_once_in_bounded_chunks(tmp_path: Path) -> None:
    """One 3 MB record costs what the same text as normal records costs: every character goes
    through the tokenizer once, in pieces no longer than DOCUMENT_CHUNK_CHARS (a record tokenised
    whole, or re-tokenised from its start at every block, would break one of the two)."""
    from olm_cli.data import DOCUMENT_CHUNK_CHARS, BlockStream
    from olm_cli.modeling import train_tokenizer

    text = _huge_text(HUGE_RECORD_CHARS // 2, seed=1)
    tokenizer = train_tokenizer([write_jsonl(tmp_path / "t.jsonl", [text[:100_000]])], "text", 320, 100_000)
    huge = write_jsonl(tmp_path / "00-a" / "huge.jsonl", [text])
    words = text.split(" ")
    normal = write_jsonl(tmp_path / "00-a" / "normal.jsonl",
                         [" ".join(words[i : i + 400]) for i in range(0, len(words), 400)])

    class CountingTokenizer:
        """The real tokenizer, recording the length of every text it is given."""

        def __init__(self) -> None:
            self.lengths: list[int] = []

        def __call__(self, texts: Any, **kwargs: Any) -> Any:
            self.lengths.extend(len(t) for t in ([texts] if isinstance(texts, str) else texts))
            return tokenizer(texts, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(tokenizer, name)

    def stream(shard: Path) -> tuple[int, list[int]]:
        counting = CountingTokenizer()
        blocks = BlockStream([shard], counting, block_size=256, domain_pattern=r"(?P<domain>[^/]+)/[^/]+$")
        return sum(len(b) for b in blocks.take(10**7)), counting.lengths

    huge_tokens, huge_calls = stream(huge)
    normal_tokens, _ = stream(normal)
    assert max(huge_calls) <= DOCUMENT_CHUNK_CHARS
    assert len(huge_calls) >= len(text) // DOCUMENT_CHUNK_CHARS
    assert abs(sum(huge_calls) - len(text)) <= 0.001 * len(text)  # each character once
    assert abs(huge_tokens - normal_tokens) <= 0.01 * normal_tokens
