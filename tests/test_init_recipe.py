"""`olm init`: the shipped starter recipes validate, explain every key, and are written safely."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import yaml
from e2e_helpers import cli

from olm_cli.init_recipe import list_templates, render, run_command, template_text
from olm_cli.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ["gguf", "hub-dataset", "pretrained", "scratch"]


def test_the_four_templates_ship_with_a_one_line_summary() -> None:
    found = list_templates()
    assert [t.name for t in found] == TEMPLATES
    assert all(t.summary.endswith(".") for t in found), [t.summary for t in found]


def test_templates_are_package_data() -> None:
    """An installed olm has them too, not only a clone of the repository."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "templates/*.yaml" in package_data["olm_cli"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_validates_where_it_is_written(tmp_path: Path, name: str) -> None:
    path = tmp_path / "nightly.yaml"
    path.write_text(render(name, str(path)), encoding="utf-8")
    recipe = load_recipe(path)
    assert Path(recipe.run.dir).is_relative_to(tmp_path)  # relative to the recipe file
    assert path.read_text().splitlines()[0] == f"# Run with:  olm train --config {path}"


@pytest.mark.parametrize("name", TEMPLATES)
def test_every_key_of_a_template_has_a_comment(name: str) -> None:
    text = template_text(name)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert re.search(r"\s#\s\S", line), f"{name}.yaml line {number} has no comment: {line!r}"
    # Every section of the recipe a template sets is one that exists (load_recipe checks the keys).
    sections = yaml.safe_load(text)
    assert {"model", "data", "run", "eval"} <= set(sections)


def test_hub_dataset_template_streams_a_hub_dataset_and_names_its_eval_domain_after_it() -> None:
    data = yaml.safe_load(template_text("hub-dataset"))
    assert data["data"]["dataset"] and "shards" not in data["data"]
    assert data["run"]["max_tokens"] > 0  # a stream needs a budget per increment
    assert list(data["eval"]["sets"]) == [Path(data["data"]["dataset"]).name]


def test_init_writes_refuses_to_overwrite_and_prints_the_next_command(tmp_path: Path) -> None:
    out = tmp_path / "recipe.yaml"
    first = cli("init", "--template", "pretrained", "--out", out)
    assert first.code == 0, first.err
    assert first.out.strip() == run_command(str(out)) == f"olm train --config {out}"
    assert "pretrained" in first.err
    written = out.read_text()
    assert written == render("pretrained", str(out))

    out.write_text("# my edits\n")
    again = cli("init", "--template", "scratch", "--out", out)
    assert again.code == 2
    assert "already exists" in again.err and "--force" in again.err and len(again.err.strip().splitlines()) == 1
    assert out.read_text() == "# my edits\n"

    forced = cli("init", "--template", "scratch", "--out", out, "--force")
    assert forced.code == 0, forced.err
    assert out.read_text() == render("scratch", str(out))


def test_init_to_stdout_writes_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = cli("init", "-t", "gguf", "--out", "-")
    assert result.code == 0, result.err
    assert result.out == template_text("gguf")
    assert yaml.safe_load(result.out)["model"]["gguf_file"].endswith(".gguf")
    assert list(tmp_path.iterdir()) == []


def test_init_honours_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        assert cli("init", "--out", tmp_path / "r.yaml").code == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "r.yaml").stat().st_mode) == 0o640


def test_init_never_writes_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "recipe.yaml"
    link.symlink_to(victim)
    assert cli("init", "--out", link).code == 2
    assert cli("init", "--out", link, "--force").code == 0
    assert victim.read_text() == "keep me\n"
    assert not link.is_symlink() and link.read_text() == render("scratch", str(link))


def test_init_errors_are_one_line_with_exit_2(tmp_path: Path) -> None:
    unknown = cli("init", "--template", "scrach", "--out", tmp_path / "r.yaml")
    assert unknown.code == 2 and "scratch" in unknown.err and len(unknown.err.strip().splitlines()) == 1
    missing = cli("init", "--out", tmp_path / "no-such-folder" / "r.yaml")
    assert missing.code == 2 and "does not exist" in missing.err
    folder = cli("init", "--out", tmp_path)
    assert folder.code == 2 and "is a directory" in folder.err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_init_list_names_every_template() -> None:
    result = cli("init", "--list")
    assert result.code == 0
    names = [line.split()[0] for line in result.out.splitlines() if line.strip()]
    assert names == TEMPLATES


@pytest.mark.slow
def test_scratch_starter_trains_where_it_says_and_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The starter, with only its data filled in, trains an increment and serves a release."""
    from conftest import make_documents, write_jsonl

    monkeypatch.chdir(tmp_path)
    made = cli("init", "--template", "scratch", "--out", "nightly.yaml")
    assert made.code == 0, made.err
    command = made.out.split()
    assert command == ["olm", "train", "--config", "nightly.yaml"]
    write_jsonl(tmp_path / "data" / "shards" / "00-news" / "day-001.jsonl", make_documents("alpha", 40, 0))
    write_jsonl(tmp_path / "data" / "eval" / "news.jsonl", make_documents("alpha", 8, 99))
    # Smaller than the starter's sizes only to keep the test fast on a CPU.
    trained = cli(*command[1:], "run.max_steps=3", "model.arch.vocab_size=300", "data.block_size=64",
                  "batch.size=4", "batch.micro_batch=4", "run.progress=false")
    assert trained.code == 0, trained.err
    result = cli("generate", "--run", "runs/scratch", "-p", "the river", "-n", "5", "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["source"] == "release"
