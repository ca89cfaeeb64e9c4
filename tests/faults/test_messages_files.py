"""Issue 9, "never fail silently": one line per message in logs, files that are safe, recipes
that cannot lie. Real ``olm`` processes with stdout a pipe (as under cron), real umasks.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_documents, write_jsonl
from e2e_helpers import (
    REPO,
    Result,
    cli,
    last_step,
    make_recipe,
    olm,
    reaped,
    subprocess_env,
    wait_for,
)
from rich.console import Console

from olm_cli.modeling import portable_tokenizer_config, save_tokenizer, train_tokenizer
from olm_cli.rundir.atomic import apply_umask, atomic_writer, umask_mode, write_bytes_atomic
from olm_cli.rundir.status import render_status

# Long enough that rich, assuming 80 columns off a terminal, used to cut every line holding it.
LONG_NAME = "a-rather-long-directory-name-for-the-nightly-continual-training-run"


def log_env() -> dict[str, str]:
    """The environment of a cron job: no COLUMNS (e2e_helpers sets one to hide wrapping)."""
    env = subprocess_env()
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def olm_as_cron(*args: str | Path, umask: int = 0o022, timeout: float = 180) -> Result:
    """``python -m olm_cli ARGS`` with stdout and stderr pipes, a cron environment and ``umask``."""
    proc = subprocess.run([sys.executable, "-m", "olm_cli", *map(str, args)], capture_output=True, text=True,
                          env=log_env(), cwd=REPO, timeout=timeout, umask=umask)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


@dataclass
class NightlyRun:
    run_dir: Path
    train: Result
    stale_pid: int
    umask: int


def nightly_run(root: Path, umask: int) -> NightlyRun:
    """One increment with replay and an eval set, in a >150-character run directory whose lock
    was left behind by a dead process, trained by a real process under ``umask``."""
    eval_file = write_jsonl(root / "heldout" / "alpha.jsonl", make_documents("alpha", 6, 99))
    run_dir = root / LONG_NAME / LONG_NAME / "run"
    assert len(str(run_dir)) > 150
    recipe = make_recipe(root, replay={"policy": "reservoir", "capacity": 32, "ratio": 0.25},
                         eval={"sets": {"alpha": str(eval_file)}}, run={"dir": str(run_dir)})
    pid = dead_pid()
    previous = os.umask(umask)  # as if the dead run had been started by the same cron job
    try:
        run_dir.mkdir(parents=True)
        (run_dir / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                   "started": "2024-01-01T03:00:00+00:00", "command": "olm train"}))
    finally:
        os.umask(previous)
    result = olm_as_cron("train", "--config", recipe, umask=umask)
    assert result.code == 0, result.text
    return NightlyRun(run_dir, result, pid, umask)


@pytest.fixture(scope="module")
def nightly_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, NightlyRun]:
    """Trained runs by umask, each trained once for the whole module (training is the slow part)."""

    class Runs(dict[int, NightlyRun]):
        def __missing__(self, umask: int) -> NightlyRun:
            self[umask] = nightly_run(tmp_path_factory.mktemp(f"umask{umask:03o}"), umask)
            return self[umask]

    return Runs()


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def nightly(request: pytest.FixtureRequest, nightly_runs: dict[int, NightlyRun]) -> NightlyRun:
    return nightly_runs[request.param]


# --------------------------------------------------------------------------- one line per message


@pytest.mark.slow
def test_increment_complete_line_holds_the_whole_checkpoint_path(nightly: NightlyRun) -> None:
    checkpoint = str((nightly.run_dir / "checkpoints" / "latest").resolve())
    lines = [line for line in nightly.train.out.splitlines() if re.search(r"increment \d+ complete", line)]
    assert len(lines) == 1, nightly.train.out
    assert lines[0].rstrip().endswith(f"→ {checkpoint}"), lines[0]
    # Wherever the run directory is printed, it is printed whole: no line holds a piece of it.
    pieces = [line for line in nightly.train.text.splitlines() if LONG_NAME[:20] in line]
    assert pieces and all(str(nightly.run_dir) in line for line in pieces), pieces


@pytest.mark.slow
def test_status_off_a_terminal_keeps_every_path_on_its_line(nightly: NightlyRun) -> None:
    result = olm_as_cron("status", "--run", nightly.run_dir)
    assert result.code == 0, result.text
    lines = result.out.splitlines()
    checkpoint = str((nightly.run_dir / "checkpoints" / "latest").resolve())
    assert lines[0] == f"olm run {nightly.run_dir.resolve()}"
    checkpoint_lines = [line for line in lines if line.startswith("last checkpoint:")]
    assert len(checkpoint_lines) == 1 and checkpoint_lines[0].endswith(checkpoint), result.out
    assert "…" not in result.out


def test_status_on_a_terminal_folds_long_paths_instead_of_cutting_them(tmp_path: Path) -> None:
    path = "/srv/" + "/".join([LONG_NAME] * 3) + "/checkpoints/step-00000024"
    status = {"run_dir": "/srv/run", "increments": 1, "shards": {"done": 2}, "tokens_trained": 3000,
              "last_checkpoint": {"step": 24, "created": "2024-01-01T03:00:00+00:00", "path": path},
              "last_eval": None, "last_metrics": None, "lock": None, "problems": []}
    out = io.StringIO()
    render_status(status, Console(file=out, width=80, force_terminal=True, color_system=None))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= 80
    assert path in re.sub(r"[│┃\s]", "", text)  # every character is there, folded over lines


@pytest.mark.slow
def test_stale_lock_takeover_is_reported_once(nightly: NightlyRun) -> None:
    notices = [line for line in nightly.train.text.splitlines() if "taking over stale lock" in line]
    assert len(notices) == 1, nightly.train.text
    assert f"pid {nightly.stale_pid}" in notices[0]


@pytest.mark.slow
def test_sigterm_notice_is_one_line_without_a_ctrl_c_hint(tmp_path: Path) -> None:
    recipe = make_recipe(tmp_path, shards=[("alpha", 0), ("beta", 0)], docs=60)
    run_dir = tmp_path / "run"
    log = tmp_path / "train.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "olm_cli", "train", "--config", str(recipe)],
                                stdout=handle, stderr=subprocess.STDOUT, env=log_env(), cwd=REPO)
    with reaped(proc):
        wait_for(lambda: last_step(run_dir) >= 2, proc, what="step 2")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    output = log.read_text(encoding="utf-8")
    assert proc.returncode == 143, output
    notices = [line for line in output.splitlines() if "received SIGTERM" in line]
    assert len(notices) == 1, output
    assert notices[0].endswith("received SIGTERM: stopping after the current step and saving a checkpoint")
    assert "Ctrl-C" not in output


# --------------------------------------------------------------------------- files


def modes_that_ignore_the_umask(root: Path, umask: int) -> list[str]:
    wrong = []
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        wanted = (0o777 if stat.S_ISDIR(info.st_mode) else 0o666) & ~umask
        if stat.S_IMODE(info.st_mode) != wanted:
            wrong.append(f"{oct(stat.S_IMODE(info.st_mode))} {path.relative_to(root)}")
    return wrong


@pytest.mark.slow
def test_every_file_of_the_run_directory_follows_the_umask(nightly: NightlyRun) -> None:
    checkpoint = (nightly.run_dir / "checkpoints" / "latest").resolve()
    written = {p.relative_to(nightly.run_dir).as_posix() for p in nightly.run_dir.rglob("*") if p.is_file()}
    # The files the issue names are all there, so the check below covers them.
    for name in ("ledger.json", "metrics.jsonl", "recipe.yaml", "eval/matrix.json"):
        assert name in written, sorted(written)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "optimizer.safetensors", "optimizer.json",
                 "trainer_state.json", "MANIFEST.json", "rng.safetensors"):
        assert (checkpoint / name).is_file(), name
    assert any(p.startswith("replay/") for p in written) and (checkpoint / "replay").is_dir()
    assert modes_that_ignore_the_umask(nightly.run_dir, nightly.umask) == []


def test_apply_umask_repairs_library_modes_and_skips_symlinks(tmp_path: Path) -> None:
    tree = tmp_path / "ckpt"
    (tree / "sub").mkdir(parents=True)
    weights = tree / "model.safetensors"
    weights.write_bytes(b"x")
    weights.chmod(0o600)  # what safetensors' NamedTempFile leaves
    (tree / "sub").chmod(0o700)  # what mkdtemp leaves
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o600)
    (tree / "link").symlink_to(outside)
    previous = os.umask(0o027)
    try:
        apply_umask(tree)
        assert umask_mode() == 0o640 and umask_mode(directory=True) == 0o750
    finally:
        os.umask(previous)
    assert modes_that_ignore_the_umask(tree, 0o027) == []
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600  # a symlink's target is not touched


def test_atomic_writer_never_writes_through_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep")
    target = tmp_path / "state.json"
    # A symlink planted at the temporary name is removed, not followed.
    (tmp_path / f".state.json.tmp-{os.getpid()}").symlink_to(victim)
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new" and victim.read_text() == "keep"
    # Without overwrite, an existing name (a symlink included) is refused and left alone.
    link = tmp_path / "export.jsonl"
    link.symlink_to(victim)
    with pytest.raises(FileExistsError), atomic_writer(link, overwrite=False) as handle:
        handle.write(b"nope")
    assert link.is_symlink() and victim.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.jsonl", "state.json", "victim"]


@pytest.mark.slow
def test_replay_export_refuses_an_existing_file_with_one_line(nightly_runs: dict[int, NightlyRun],
                                                              tmp_path: Path) -> None:
    run_dir = nightly_runs[0o022].run_dir
    target = tmp_path / "replay.jsonl"
    target.write_text("yesterday's export\n")
    refused = olm("replay-inspect", "--run", run_dir, "--export", target)
    assert refused.code == 1, refused.text
    assert refused.err == f"error: --export {target}: the file already exists; pass --force to replace it\n"
    assert target.read_text() == "yesterday's export\n"

    victim = tmp_path / "victim.txt"
    victim.write_text("not an export\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(victim)
    forced = cli("replay-inspect", "--run", run_dir, "--export", link, "--force")
    assert forced.code == 0, forced.text
    assert not link.is_symlink() and json.loads(link.read_text().splitlines()[0])["tokens"]
    assert victim.read_text() == "not an export\n"


# --------------------------------------------------------------------------- recipes


@pytest.mark.slow
def test_duplicate_key_is_exit_2_naming_both_lines(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        model:
          init: scratch
        run:
          dir: runs/first
        data:
          shards: [data/*.jsonl]
          block_size: 32
        run:
          dir: runs/second
        """), encoding="utf-8")
    result = olm("validate", "--config", recipe)
    assert result.code == 2, result.text
    assert result.err == f"error: {recipe}:8: duplicate key 'run' (first at line 3)\n"
    assert result.out == ""


# --------------------------------------------------------------------------- tokenizer


def test_portable_tokenizer_config_drops_load_options_and_fake_lengths() -> None:
    saved = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", "local_files_only": True,
             "is_local": True, "trust_remote_code": False, "revision": "main", "eos_token": "<|endoftext|>",
             "model_max_length": int(1e30), "extra_special_tokens": ["<|a|>"]}
    assert portable_tokenizer_config(saved, fast=True, max_length=None) == {
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "additional_special_tokens": ["<|a|>"],
    }
    assert portable_tokenizer_config(saved, fast=True, max_length=2048)["model_max_length"] == 2048
    slow = portable_tokenizer_config({"tokenizer_class": "LlamaTokenizer", "model_max_length": 4096}, fast=False,
                                     max_length=None)
    assert slow == {"tokenizer_class": "LlamaTokenizer", "model_max_length": 4096}


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, Path]:
    root = tmp_path_factory.mktemp("tokenizer")
    shard = write_jsonl(root / "shard.jsonl", make_documents("alpha", 40, 0) + make_documents("beta", 40, 0))
    tokenizer = train_tokenizer([shard], "text", 300, 100_000)
    directory = root / "checkpoint"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    previous = os.umask(0o027)
    try:
        save_tokenizer(tokenizer, directory)
    finally:
        os.umask(previous)
    return tokenizer, directory


SAMPLE = "the river runs past the old mill <|endoftext|> def return lambda"


def test_saved_tokenizer_reloads_identically_with_a_real_length(saved_tokenizer: tuple[object, Path]) -> None:
    from transformers import AutoTokenizer

    tokenizer, directory = saved_tokenizer
    config = json.loads((directory / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 128  # the model's max_position_embeddings, not 1e30
    assert not {"local_files_only", "trust_remote_code", "revision", "backend", "is_local"} & config.keys()
    reloaded = AutoTokenizer.from_pretrained(str(directory))
    assert reloaded(SAMPLE).input_ids == tokenizer(SAMPLE).input_ids  # type: ignore[operator]
    assert (reloaded.eos_token, reloaded.pad_token) == ("<|endoftext|>", "<|pad|>")
    assert {oct(stat.S_IMODE((directory / name).stat().st_mode)) for name in config_files(directory)} == {"0o640"}
    assert not [p for p in directory.iterdir() if p.name.startswith(".")]  # no staging left behind


def config_files(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith("tokenizer")]


FLOOR_PYTHON = Path(os.environ.get("OLM_TF_FLOOR_PYTHON", str(REPO / ".venv-tf-floor" / "bin" / "python")))


@pytest.mark.slow
@pytest.mark.skipif(not FLOOR_PYTHON.exists(),
                    reason=f"no transformers-4.46 venv at {FLOOR_PYTHON}: build it with scripts/check_tokenizer_floor.sh")
def test_saved_tokenizer_loads_with_the_oldest_supported_transformers(saved_tokenizer: tuple[object, Path]) -> None:
    tokenizer, directory = saved_tokenizer
    probe = textwrap.dedent(f"""
        import json, sys, transformers
        from transformers import AutoTokenizer
        t = AutoTokenizer.from_pretrained(sys.argv[1])
        print(json.dumps({{"version": transformers.__version__, "class": type(t).__name__,
                          "ids": t({SAMPLE!r}).input_ids, "max": t.model_max_length, "eos": t.eos_token}}))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([str(FLOOR_PYTHON), "-c", probe, str(directory)], capture_output=True, text=True,
                          env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["version"].startswith("4.46.")
    assert seen["class"] == "PreTrainedTokenizerFast"
    assert seen["ids"] == tokenizer(SAMPLE).input_ids  # type: ignore[operator]
    assert (seen["max"], seen["eos"]) == (128, "<|endoftext|>")
