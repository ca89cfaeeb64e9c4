"""Helpers for the end-to-end tests that drive the real ``olm`` command line.

Two ways to run a command:

* :func:`olm` / :func:`spawn` start ``python -m olm_cli`` in a subprocess: needed wherever a
  test sends signals (SIGTERM, kill -9), holds the lock from another process, or measures
  the cost of starting the interpreter.
* :func:`cli` calls :func:`olm_cli.cli.main` in this process with ``sys.argv`` set, exactly as
  the console script does (same error handling, same exit codes), minus the ~5 s it takes a
  fresh interpreter to import torch and transformers. Most tests use it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from conftest import add_shard, tiny_recipe, write_recipe
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)


# The test models are tiny: one intra-op thread is faster than two, and far faster when other
# processes compete for the cores (OpenMP threads spin waiting for each other). In-process runs
# and subprocesses use the same count, so their floating-point results can be compared bit for bit.
THREADS = 1


def subprocess_env() -> dict[str, str]:
    # Wide COLUMNS: rich must not wrap the messages the tests look for.
    return {**os.environ, **OFFLINE, "PYTHONPATH": str(REPO), "COLUMNS": "400",
            "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(THREADS),
            "MKL_NUM_THREADS": str(THREADS)}


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err

    def has(self, needle: str) -> bool:
        """Whitespace-insensitive search (rich may still fold very long paths)."""
        return "".join(needle.split()) in "".join(self.text.split())

    def json(self) -> Any:
        return json.loads(self.out)


def cli(*args: str | Path) -> Result:
    """Run ``olm ARGS`` in-process through the real entry point; return exit code and output."""
    from olm_cli import cli as cli_module

    argv = ["olm", *map(str, args)]
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, cli_module.console.width, cli_module.err_console.width
    threads = torch.get_num_threads()
    cli_module.console.width = cli_module.err_console.width = 400
    sys.argv = argv
    torch.set_num_threads(THREADS)
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli_module.main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, cli_module.console.width, cli_module.err_console.width = saved
        torch.set_num_threads(threads)
    return Result(code, out.getvalue(), err.getvalue())


def olm(*args: str | Path, timeout: float = 120) -> Result:
    """Run ``python -m olm_cli ARGS`` in a subprocess and wait for it."""
    proc = subprocess.run([sys.executable, "-m", "olm_cli", *map(str, args)], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def spawn(*args: str | Path, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m olm_cli ARGS`` in the background, stdout+stderr into ``log``."""
    handle = open(log, "wb")  # noqa: SIM115 - owned by the child
    try:
        return subprocess.Popen([sys.executable, "-m", "olm_cli", *map(str, args)], stdout=handle,
                                stderr=subprocess.STDOUT, env=subprocess_env(), cwd=REPO)
    finally:
        handle.close()


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Never leave a training child behind when a test fails."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


def last_step(run_dir: Path) -> int:
    """Step of the last complete line of ``metrics.jsonl`` (0 if none yet)."""
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return 0


def wait_for(predicate: Any, proc: subprocess.Popen[bytes] | None = None, timeout: float = 90,
             what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- run directory


def make_recipe(tmp_path: Path, *, shards: list[tuple[str, int]] | None = None, docs: int = 24,
                name: str = "recipe.yaml", **sections: dict[str, Any]) -> Path:
    """Write shards (domain, index) under ``tmp_path/stream`` and a tiny recipe; return its path."""
    for domain, index in shards if shards is not None else [("alpha", 0), ("alpha", 1)]:
        add_shard(tmp_path / "stream", domain, index, docs=docs)
    return write_recipe(tmp_path, tiny_recipe(tmp_path, **sections), name=name)


def ledger(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``RUN/ledger.json`` keyed by shard file name relative to the stream folder."""
    state = json.loads((run_dir / "ledger.json").read_text(encoding="utf-8"))
    return {"/".join(Path(e["path"]).parts[-2:]): e for e in state["shards"]}


def ledger_summary(run_dir: Path) -> dict[str, tuple[str, int, int | None]]:
    return {name: (e["status"], e["tokens"], e["increment"]) for name, e in ledger(run_dir).items()}


def latest(run_dir: Path) -> Path:
    link = run_dir / "checkpoints" / "latest"
    return (link.parent / os.readlink(link)).resolve()


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    # Cloned: safetensors may map the file, and tests truncate checkpoint files afterwards.
    return {k: v.clone() for k, v in load_file(str(Path(checkpoint) / "model.safetensors")).items()}


def assert_bit_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    different = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def trainer_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
