"""`replay-inspect`: locating the latest snapshot and reporting on it."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from olm_cli.errors import DataError
from olm_cli.replay import REPLAY_BUFFERS, ReplayConfig
from olm_cli.replay.inspect import find_buffer_dir, inspect_replay
from olm_cli.samples import Block
from olm_cli.strategy import StrategyContext


class CharTokenizer:
    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(97 + t % 26) for t in token_ids)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """RUN/checkpoints/step-*/replay snapshots and a `latest` link to the newest one."""
    run = tmp_path / "run"
    buffer = REPLAY_BUFFERS.build(
        ReplayConfig(policy="reservoir", capacity=40), StrategyContext(seed=0, run_dir=run)
    )
    for step in range(1, 11):
        blocks = [
            Block(
                np.arange(j, j + 3 + j % 4, dtype=np.int32),
                f"shard{j % 2}.txt",
                ["web", "code"][j % 2 and step % 2],
            )
            for j in range(6)
        ]
        buffer.add(blocks, step, scores=[float(j) for j in range(6)])
        buffer.sample(3)
        if step in (5, 10):
            buffer.save(run / "checkpoints" / f"step-{step:08d}" / "replay")
    os.symlink("step-00000010", run / "checkpoints" / "latest")
    return run


def capture() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120, color_system=None), out


def test_find_buffer_dir_follows_latest(run_dir: Path) -> None:
    expected = (run_dir / "checkpoints" / "step-00000010" / "replay").resolve()
    assert find_buffer_dir(run_dir).resolve() == expected
    assert find_buffer_dir(expected) == expected  # a snapshot dir is accepted as is
    (run_dir / "checkpoints" / "latest").unlink()
    assert find_buffer_dir(run_dir).resolve() == expected  # highest step without the link


def test_find_buffer_dir_errors_clearly(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no replay buffer"):
        find_buffer_dir(tmp_path)
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    os.symlink("step-00000001", tmp_path / "checkpoints" / "latest")
    with pytest.raises(DataError, match="has no replay buffer"):
        find_buffer_dir(tmp_path)
    with pytest.raises(DataError, match="not a directory"):
        find_buffer_dir(tmp_path / "missing")


def test_json_report(run_dir: Path) -> None:
    console, out = capture()
    report = inspect_replay(find_buffer_dir(run_dir), as_json=True, console=console)
    printed = json.loads(out.getvalue())
    assert printed == report
    assert {
        "policy",
        "size",
        "tokens",
        "capacity",
        "capacity_unit",
        "fill",
        "by_domain",
        "by_shard",
        "age_histogram",
        "score_histogram",
        "most_replayed",
        "previews",
    } <= report.keys()
    assert report["policy"] == "reservoir" and report["size"] == 40 and report["step"] == 10
    assert sum(row["samples"] for row in report["by_domain"]) == 40
    assert {row["name"] for row in report["by_shard"]} == {"shard0.txt", "shard1.txt"}
    assert sum(report["age_histogram"]["counts"]) == 40
    assert report["most_replayed"][0]["replayed"] >= report["most_replayed"][-1]["replayed"]


def test_rich_report_and_previews(run_dir: Path) -> None:
    console, out = capture()
    report = inspect_replay(
        find_buffer_dir(run_dir), show=3, tokenizer=CharTokenizer(), console=console
    )
    text = out.getvalue()
    for heading in (
        "Composition by domain",
        "Composition by shard",
        "Age",
        "Score",
        "Most replayed",
    ):
        assert heading in text
    assert len(report["previews"]) == 3 and all("text" in p for p in report["previews"])
    assert report["previews"][0]["text"] in text
    console, out = capture()
    report = inspect_replay(find_buffer_dir(run_dir), show=2, console=console)
    assert all(isinstance(p["token_ids"], list) for p in report["previews"])


def test_export_writes_one_line_per_sample(run_dir: Path, tmp_path: Path) -> None:
    console, _ = capture()
    target = tmp_path / "out" / "buffer.jsonl"
    inspect_replay(
        find_buffer_dir(run_dir), export=target, tokenizer=CharTokenizer(), console=console
    )
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert len(lines) == 40
    assert {"id", "domain", "shard", "step", "score", "replayed", "tokens", "text"} <= lines[
        0
    ].keys()
    assert lines[0]["text"] == CharTokenizer().decode(lines[0]["tokens"])
    assert [line["id"] for line in lines] == sorted(line["id"] for line in lines)


def test_older_snapshot_is_still_readable(run_dir: Path) -> None:
    console, _ = capture()
    report = inspect_replay(
        run_dir / "checkpoints" / "step-00000005" / "replay", as_json=True, console=console
    )
    assert report["step"] == 5


def test_export_refuses_an_existing_file_before_any_work(run_dir: Path, tmp_path: Path) -> None:
    console, out = capture()
    target = tmp_path / "buffer.jsonl"
    target.write_text("precious\n")
    with pytest.raises(DataError, match=r"--export .*buffer\.jsonl: the file already exists; pass --force"):
        inspect_replay(find_buffer_dir(run_dir), export=target, console=console)
    assert target.read_text() == "precious\n"
    assert out.getvalue() == ""  # refused before the report was printed
    inspect_replay(find_buffer_dir(run_dir), export=target, overwrite=True, console=console)
    assert len(target.read_text().splitlines()) == 40
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_export_never_writes_through_a_symlink(run_dir: Path, tmp_path: Path) -> None:
    console, _ = capture()
    victim = tmp_path / "victim.txt"
    victim.write_text("do not touch\n")
    link = tmp_path / "buffer.jsonl"
    link.symlink_to(victim)
    with pytest.raises(DataError, match="already exists"):
        inspect_replay(find_buffer_dir(run_dir), export=link, console=console)
    dangling = tmp_path / "dangling.jsonl"
    dangling.symlink_to(tmp_path / "nowhere.txt")
    with pytest.raises(DataError, match="already exists"):
        inspect_replay(find_buffer_dir(run_dir), export=dangling, console=console)
    assert not (tmp_path / "nowhere.txt").exists()

    # With --force the link itself is replaced by the export; its target is left alone.
    inspect_replay(find_buffer_dir(run_dir), export=link, overwrite=True, console=console)
    assert not link.is_symlink() and len(link.read_text().splitlines()) == 40
    assert victim.read_text() == "do not touch\n"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_mode_follows_the_umask(run_dir: Path, tmp_path: Path, umask: int) -> None:
    console, _ = capture()
    previous = os.umask(umask)
    try:
        inspect_replay(find_buffer_dir(run_dir), export=tmp_path / "b.jsonl", console=console)
    finally:
        os.umask(previous)
    assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask
