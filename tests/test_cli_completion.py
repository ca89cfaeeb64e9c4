"""`olm --version` and shell completion (typer's --install-completion / --show-completion)."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest
from e2e_helpers import cli

import olm_cli
from olm_cli.cli import package_version

ROOT = Path(__file__).resolve().parents[1]


def test_version_prints_the_package_version() -> None:
    result = cli("--version")
    assert result.code == 0
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert declared is not None
    assert result.out == f"olm {declared.group(1)}\n"


def test_version_falls_back_to_the_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert package_version() == olm_cli.__version__


def test_show_completion_prints_a_bash_script_for_olm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHELL", "/bin/bash")
    result = cli("--show-completion", "bash")
    assert result.code == 0, result.err
    # Named after `olm` even when run as `python -m olm_cli` (the tests run it in-process).
    assert "_OLM_COMPLETE=complete_bash" in result.out
    assert result.out.rstrip().endswith("complete -o default -F _olm_completion olm")


@pytest.mark.parametrize(("words", "expected"), [
    ("olm ge", ["generate"]),
    ("olm init --template h", ["hub-dataset"]),
    ("olm generate --max", ["--max-new-tokens"]),
])
def test_completion_completes_commands_options_and_templates(
        monkeypatch: pytest.MonkeyPatch, words: str, expected: list[str]) -> None:
    monkeypatch.setenv("_OLM_COMPLETE", "complete_bash")
    monkeypatch.setenv("COMP_WORDS", words)
    monkeypatch.setenv("COMP_CWORD", str(len(words.split()) - 1))
    result = cli()
    assert result.code == 0, result.err
    assert result.out.split() == expected


def test_help_lists_the_new_commands_and_options() -> None:
    result = cli("--help")
    assert result.code == 0
    for word in ("generate", "init", "--version", "--install-completion", "--show-completion"):
        assert word in result.out
