"""CheckpointManager: atomic save, ENOSPC, corruption fallback, keep-K, the latest link."""

from __future__ import annotations

import errno
import gc
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from olm_cli.errors import CheckpointError, CheckpointLoadError
from olm_cli.rundir import atomic as atomic_mod
from olm_cli.rundir import checkpoint as checkpoint_mod
from olm_cli.rundir.checkpoint import (
    CheckpointFallback,
    CheckpointManager,
    CheckpointVerifyError,
    format_bytes,
    loading_checkpoint,
)


def writer(tag: str) -> Callable[[Path], None]:
    """Write a small HF-like checkpoint whose contents identify ``tag``."""

    def write(directory: Path) -> None:
        (directory / "config.json").write_text(json.dumps({"tag": tag}))
        (directory / "model.safetensors").write_bytes(tag.encode() * 100)
        (directory / "replay").mkdir()
        (directory / "replay" / "buffer.json").write_text("[1, 2, 3]")

    return write


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "checkpoints", keep=3)


def test_save_publishes_complete_checkpoint_with_manifest(manager: CheckpointManager):
    path = manager.save(120, writer("a"), metadata={"increment": 1})

    assert path == manager.root / "step-00000120"
    manifest = json.loads((path / "MANIFEST.json").read_text())
    assert manifest["step"] == 120 and manifest["metadata"] == {"increment": 1}
    assert manifest["created"]
    files = {f["path"]: f for f in manifest["files"]}
    assert set(files) == {"config.json", "model.safetensors", "replay/buffer.json"}
    assert files["model.safetensors"]["size"] == 100
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(b"a" * 100).hexdigest()
    link = manager.root / "latest"
    assert link.is_symlink() and os.readlink(link) == "step-00000120"  # relative
    # The link is a loadable path: files resolve through it.
    assert json.loads((link / "config.json").read_text()) == {"tag": "a"}
    assert manager.latest() == path
    manager.verify(path, deep=True)
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step-00000120"]


def test_keep_k_prunes_oldest(manager: CheckpointManager):
    for step in (10, 20, 30, 40, 50):
        manager.save(step, writer(str(step)))
    assert [p.name for p in manager.list()] == ["step-00000030", "step-00000040", "step-00000050"]
    assert manager.latest() == manager.root / "step-00000050"


def test_prune_never_removes_latest_target_and_drops_broken(tmp_path: Path):
    manager = CheckpointManager(tmp_path / "ck", keep=1)
    manager.save(10, writer("10"))
    manager.save(20, writer("20"))
    # Resume from 20, but a newer broken leftover exists (e.g. copied in by hand).
    broken = manager.root / "step-00000030"
    broken.mkdir()
    assert manager.prune() == [broken]
    assert [p.name for p in manager.list()] == ["step-00000020"]


def test_enospc_midway_leaves_previous_checkpoint_untouched(manager: CheckpointManager):
    good = manager.save(120, writer("good"))

    def fill_disk(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError) as info:
        manager.save(140, fill_disk)
    # The previous checkpoint (424 bytes) would fit in what is free: the free space is the bound.
    assert str(info.value) == (
        "could not write checkpoint step-00000140: No space left on device "
        f"(needs more than the {format_bytes(shutil.disk_usage(manager.root).free)} free on {manager.root})"
    )
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step-00000120"]
    assert manager.latest() == good
    manager.verify(good, deep=True)


def test_staged_checkpoint_is_published_with_what_the_stage_wrote(manager: CheckpointManager):
    """The replay snapshot is staged in the training thread, the rest written later (async checkpoints)."""
    previous = manager.save(1, writer("one"))

    def replay(directory: Path) -> None:
        (directory / "replay").mkdir()
        (directory / "replay" / "MANIFEST.json").write_text("{}")

    tmp = manager.stage(2, replay)
    assert manager.latest() == previous  # nothing is visible before save
    assert tmp.name.startswith(".tmp-step-") and (tmp / "replay" / "MANIFEST.json").is_file()

    def rest(directory: Path) -> None:
        (directory / "model.safetensors").write_bytes(b"w" * 10)

    path = manager.save(2, rest, staged=True)

    assert manager.latest() == path
    files = {item["path"] for item in json.loads((path / "MANIFEST.json").read_text())["files"]}
    assert files == {"model.safetensors", "replay/MANIFEST.json"}
    assert not tmp.exists()


def test_failed_stage_or_staged_save_leaves_nothing_behind(manager: CheckpointManager):
    good = manager.save(1, writer("one"))

    def no_space(directory: Path) -> None:
        (directory / "replay").mkdir()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match=r"^could not write checkpoint step-00000002: No space left on device"):
        manager.stage(2, no_space)
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step-00000001"]

    manager.stage(3, lambda directory: (directory / "parts.json").write_text("{}"))
    with pytest.raises(CheckpointError, match=r"^could not write checkpoint step-00000003: No space left on device"):
        manager.save(3, no_space, staged=True)
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step-00000001"]
    assert manager.latest() == good
    # A save that was never staged is a bug in the caller, reported, not published empty.
    with pytest.raises(CheckpointError, match="was not staged"):
        manager.save(4, writer("four"), staged=True)


def test_failing_fsync_is_a_checkpoint_error_and_nothing_moves(
    manager: CheckpointManager, monkeypatch
):
    good = manager.save(1, writer("one"))

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match=r"step-00000002: No space left on device \(needs more than"):
        manager.save(2, writer("two"))
    monkeypatch.undo()
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step-00000001"]
    assert manager.latest() == good


def test_failure_after_publish_restores_previous_latest(manager: CheckpointManager, monkeypatch):
    """ENOSPC on the final directory fsync, after ``latest`` already moved."""
    good = manager.save(1, writer("one"))
    real = atomic_mod.fsync_dir
    calls = {"n": 0}

    def flaky(path: Path) -> None:
        if Path(path) == manager.root and os.readlink(manager.root / "latest") == "step-00000002":
            calls["n"] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path)

    monkeypatch.setattr(checkpoint_mod, "fsync_dir", flaky)
    with pytest.raises(CheckpointError):
        manager.save(2, writer("two"))
    monkeypatch.undo()
    assert calls["n"] == 1
    assert os.readlink(manager.root / "latest") == "step-00000001"
    assert [p.name for p in manager.list()] == ["step-00000001"]
    assert manager.latest() == good


def test_symlink_failure_leaves_latest(manager: CheckpointManager, monkeypatch):
    manager.save(1, writer("one"))

    def no_symlink(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "symlink", no_symlink)
    with pytest.raises(CheckpointError):
        manager.save(2, writer("two"))
    monkeypatch.undo()
    assert [p.name for p in manager.list()] == ["step-00000001"]
    assert os.readlink(manager.root / "latest") == "step-00000001"
    assert not [p for p in manager.root.iterdir() if p.name.startswith(".")]


def test_non_os_errors_clean_up_and_propagate(manager: CheckpointManager):
    def buggy(directory: Path) -> None:
        (directory / "x").write_text("x")
        raise KeyError("bug")

    with pytest.raises(KeyError):
        manager.save(5, buggy)
    assert list(manager.root.iterdir()) == []


def test_truncated_model_falls_back_with_warning(manager: CheckpointManager, caplog):
    older = manager.save(100, writer("old"))
    newer = manager.save(120, writer("new"))
    with open(newer / "model.safetensors", "r+b") as fh:
        fh.truncate(10)

    with caplog.at_level(logging.WARNING):
        assert manager.latest() == older
    assert "step-00000120 is unusable" in caplog.text
    assert "model.safetensors is 10 bytes, manifest says 300" in caplog.text
    choice = manager.resolve_latest()
    assert choice.path == older
    assert [r.path for r in choice.rejected] == [newer]


def test_missing_manifest_falls_back(manager: CheckpointManager):
    older = manager.save(100, writer("old"))
    newer = manager.save(120, writer("new"))
    (newer / "MANIFEST.json").unlink()
    choice = manager.resolve_latest()
    assert choice.path == older
    assert "MANIFEST.json is missing" in choice.rejected[0].reason


def test_deep_verify_catches_same_size_corruption(manager: CheckpointManager):
    older = manager.save(100, writer("old"))
    newer = manager.save(120, writer("new"))
    (newer / "model.safetensors").write_bytes(b"x" * 300)  # same size, other bytes
    assert manager.latest() == newer  # shallow check cannot tell
    assert manager.latest(deep=True) == older
    with pytest.raises(CheckpointError, match="sha256"):
        manager.verify(newer, deep=True)


def test_no_checkpoint_at_all(manager: CheckpointManager):
    assert manager.latest() is None
    assert manager.list() == []
    assert manager.cleanup_temp() == []


def test_dangling_latest_uses_newest_that_verifies(manager: CheckpointManager):
    manager.save(1, writer("one"))
    two = manager.save(2, writer("two"))

    shutil.rmtree(two)
    choice = manager.resolve_latest()
    assert choice.path == manager.root / "step-00000001"
    assert "points to missing step-00000002" in choice.rejected[0].reason


def test_cleanup_temp_removes_partial_and_restores_trash(manager: CheckpointManager):
    manager.save(1, writer("one"))
    partial = manager.root / ".tmp-step-00000002"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    (manager.root / ".latest.tmp-999").symlink_to("step-00000001")
    # Crash between moving an old step-3 aside and publishing its replacement.
    trashed = manager.save(3, writer("three")).rename(manager.root / ".trash-step-00000003")

    removed = manager.cleanup_temp()

    assert sorted(p.name for p in removed) == [".latest.tmp-999", ".tmp-step-00000002"]
    assert (manager.root / "step-00000003").is_dir() and not trashed.exists()
    assert manager.latest() == manager.root / "step-00000003"


def test_resaving_same_step_replaces_it(manager: CheckpointManager):
    manager.save(1, writer("one"))
    manager.save(2, writer("first"))
    path = manager.save(2, writer("again"))
    assert json.loads((path / "config.json").read_text()) == {"tag": "again"}
    assert [p.name for p in manager.list()] == ["step-00000001", "step-00000002"]
    assert not [p for p in manager.root.iterdir() if p.name.startswith(".")]
    manager.verify(path, deep=True)


def test_keep_must_be_positive(tmp_path: Path):
    with pytest.raises(ValueError):
        CheckpointManager(tmp_path, keep=0)


def test_checkpoints_beyond_latest_are_an_abandoned_future(manager: CheckpointManager):
    """A save crashed after its rename but before ``latest`` moved; resume used 100."""
    manager.save(100, writer("100"))
    orphan = manager.save(140, writer("orphan"))
    (manager.root / "latest").unlink()
    (manager.root / "latest").symlink_to("step-00000100")
    assert manager.latest() == manager.root / "step-00000100"  # the link is the commit point

    manager.save(110, writer("110"))

    assert not orphan.exists()
    assert [p.name for p in manager.list()] == ["step-00000100", "step-00000110"]


def test_latest_link_loads_with_transformers(manager: CheckpointManager):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    manager.save(7, lambda d: model.save_pretrained(d, safe_serialization=True))

    loaded = transformers.AutoModelForCausalLM.from_pretrained(manager.root / "latest")

    assert loaded.config.n_embd == 8
    manager.verify(manager.root / "step-00000007", deep=True)


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB filesystem, so writes fail with a genuine ENOSPC (needs root)."""
    mountpoint = tmp_path / "tiny"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mountpoint)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("serializer", ["torch", "safetensors", "plain"])
def test_real_full_disk_keeps_previous_checkpoint(full_disk: Path, serializer: str):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    manager = CheckpointManager(full_disk / "checkpoints")
    good = manager.save(1, writer("one"))
    big = {"exp_avg": torch.zeros(200_000)}  # 800 KB on a 256 KiB disk

    def write(directory: Path) -> None:
        writer("two")(directory)
        if serializer == "torch":
            torch.save(big, directory / "optimizer.pt")
        elif serializer == "safetensors":
            save_file(big, str(directory / "model.safetensors"))
        else:
            (directory / "blob").write_bytes(bytes(800_000))

    with pytest.raises(
        CheckpointError, match=r"^could not write checkpoint step-00000002: "
    ) as info:
        manager.save(2, write)
    assert "\n" not in str(info.value)
    # However the serializer put it, the message says what happened and what it takes.
    # The 800 KB write outgrew the previous checkpoint: what it wrote, or else what is free,
    # bounds what it needs (safetensors deletes its partial file).
    size = r"\d+(\.\d)? (bytes|KiB)"
    root = re.escape(str(manager.root))
    assert re.fullmatch(
        rf"could not write checkpoint step-00000002: No space left on device "
        rf"\(needs more than ({size}, {size} free|the {size} free) on {root}\)",
        str(info.value),
    ), str(info.value)
    assert sorted(p.name for p in manager.root.iterdir()) == ["latest", "step-00000001"]
    assert manager.latest() == good
    manager.verify(good, deep=True)
    # torch's writer keeps its fd open until the traceback that references it is dropped.
    del info
    gc.collect()
    manager.save(3, writer("three"))  # the partial checkpoint's space was freed


# --------------------------------------------------------------------------- deep verification
# and fallback (issue 9: bytes flipped in place used to be trained on, exit 0)


def flip_bytes(path: Path, offset: int, count: int = 64) -> None:
    """Invert ``count`` bytes at ``offset`` in place: same size, so only a re-hash can tell."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        data = fh.read(count)
        fh.seek(offset)
        fh.write(bytes(b ^ 0xFF for b in data))


def test_deep_verify_names_the_file_flipped_in_place(manager: CheckpointManager):
    path = manager.save(100, writer("old"))
    flip_bytes(path / "model.safetensors", 100, 64)

    manager.verify(path)  # sizes still match
    with pytest.raises(CheckpointVerifyError) as info:
        manager.verify(path, deep=True)
    assert info.value.reason == "model.safetensors does not match its sha256"
    assert str(info.value) == f"{path}: model.safetensors does not match its sha256"


def test_hashed_files_are_checked_by_the_cheap_verify(manager: CheckpointManager):
    path = manager.save(100, writer("old"))
    flip_bytes(path / "config.json", 0, 4)

    manager.verify(path, hashed=("model.safetensors",))  # only the named files are read
    with pytest.raises(CheckpointVerifyError, match="config.json does not match its sha256"):
        manager.verify(path, hashed=("config.json",))


def test_fallback_rejects_each_checkpoint_once_and_names_where_it_lands(manager: CheckpointManager):
    one = manager.save(4, writer("one"))
    two = manager.save(8, writer("two"))
    three = manager.save(12, writer("three"))
    (two / "config.json").write_text("{}")  # wrong size: the cheap check rejects it
    fallback = CheckpointFallback(manager)

    assert fallback.choose() == three
    assert fallback.warnings() == []
    fallback.reject(three, "model.safetensors does not match its sha256")  # found by the deep check

    assert fallback.choose() == one  # the older one
    assert fallback.warnings() == [
        "checkpoint step-00000012 is unusable (model.safetensors does not match its sha256); "
        "falling back to step-00000004",
        "checkpoint step-00000008 is unusable (config.json is 2 bytes, manifest says 14); "
        "falling back to step-00000004",
    ]
    assert fallback.warnings() == []  # reported once
    fallback.reject(one, "cannot load optimizer.pt (bad)")
    assert fallback.choose() is None
    assert [r.path for r in fallback.rejected] == [three, two, one]


def test_rejections_are_reported_only_once_a_choice_holds(manager: CheckpointManager):
    """step-12 falls back to step-8, which fails its deep check too: one line each, both to step-4."""
    one = manager.save(4, writer("one"))
    two = manager.save(8, writer("two"))
    three = manager.save(12, writer("three"))
    flip_bytes(two / "model.safetensors", 0)
    fallback = CheckpointFallback(manager)
    assert fallback.choose() == three
    fallback.reject(three, "cannot load the model")
    assert fallback.choose() == two  # the cheap check cannot see the flipped bytes
    fallback.reject(two, "model.safetensors does not match its sha256")
    assert fallback.choose() == one
    assert fallback.warnings() == [
        "checkpoint step-00000012 is unusable (cannot load the model); falling back to step-00000004",
        "checkpoint step-00000008 is unusable (model.safetensors does not match its sha256); "
        "falling back to step-00000004",
    ]


def test_no_usable_checkpoint_is_one_error_listing_every_reason(manager: CheckpointManager):
    old = manager.save(4, writer("one"))
    new = manager.save(8, writer("two"))
    flip_bytes(new / "model.safetensors", 0)
    (old / "config.json").unlink()
    fallback = CheckpointFallback(manager)

    assert fallback.choose(deep=True) is None
    error = fallback.none_usable("move it aside")

    assert str(error) == (
        f"no usable checkpoint in {manager.root}: "
        "step-00000008 (model.safetensors does not match its sha256); "
        "step-00000004 (config.json is missing). move it aside"
    )
    assert not isinstance(error, CheckpointLoadError) and "\n" not in str(error)


def test_loading_checkpoint_turns_reader_failures_into_one_line(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(4)}, str(weights))
    flip_bytes(weights, 8, 16)  # inside the JSON header
    optimizer = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.zeros(4)}}}, optimizer)
    flip_bytes(optimizer, 0, 64)

    with pytest.raises(CheckpointLoadError) as header:
        with loading_checkpoint(tmp_path, "the model"):
            load_file(str(weights))
    assert header.value.path == tmp_path
    assert header.value.reason.startswith("cannot load the model (Error while deserializing header")

    with pytest.raises(CheckpointLoadError) as pickled:
        with loading_checkpoint(tmp_path, "optimizer.pt"):
            torch.load(optimizer, weights_only=True)
    # torch's paragraph of advice about weights_only is cut down to what went wrong.
    assert re.fullmatch(r"cannot load optimizer.pt \(not a valid torch file: .+\)", pickled.value.reason)
    assert "\n" not in str(pickled.value)


def test_loading_checkpoint_lets_memory_and_recipe_errors_through(tmp_path: Path):
    with pytest.raises(MemoryError):
        with loading_checkpoint(tmp_path, "the model"):
            raise MemoryError
    with pytest.raises(CheckpointError, match="another policy") as kept:
        with loading_checkpoint(tmp_path, "the replay buffer", keep=(CheckpointError,)):
            raise CheckpointError("snapshot written by another policy")
    assert not isinstance(kept.value, CheckpointLoadError)
    with pytest.raises(CheckpointLoadError, match=r"cannot load the RNG state \(KeyError 'torch'\)"):
        with loading_checkpoint(tmp_path, "the RNG state"):
            raise KeyError("torch")


def test_load_tree_reports_unreadable_state_as_load_error(tmp_path: Path):
    torch = pytest.importorskip("torch")
    from olm_cli.state_files import load_tree, save_tree

    save_tree(tmp_path / "parts", {"selector": {"centroids": torch.ones(3)}, "batch": {"n": 1}})
    assert load_tree(tmp_path / "parts")["batch"] == {"n": 1}
    flip_bytes(tmp_path / "parts.safetensors", 8, 8)
    with pytest.raises(CheckpointLoadError, match=r"parts.safetensors is unreadable") as bad_tensors:
        load_tree(tmp_path / "parts")
    assert bad_tensors.value.path == tmp_path
    (tmp_path / "parts.json").write_bytes(b"\xff{not json")
    with pytest.raises(CheckpointLoadError, match=r"parts.json is unreadable"):
        load_tree(tmp_path / "parts")


# --------------------------------------------------------------------------- write failures


def test_full_disk_estimate_is_the_previous_checkpoint(manager: CheckpointManager, monkeypatch):
    good = manager.save(2, writer("a" * 5000))  # about 500 KB
    size = sum(f["size"] for f in json.loads((good / "MANIFEST.json").read_text())["files"])
    monkeypatch.setattr(checkpoint_mod.shutil, "disk_usage", lambda _p: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000))

    def short_write(directory: Path) -> None:  # what torch.save raises on a full disk
        (directory / "optimizer.pt").write_bytes(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 192 vs 86")

    with pytest.raises(CheckpointError) as info:
        manager.save(4, short_write)
    assert str(info.value) == (
        f"could not write checkpoint step-00000004: No space left on device "
        f"(needs about {format_bytes(size)}, 1000 bytes free on {manager.root})"
    )
    assert format_bytes(size).endswith("KiB")


def test_other_write_failures_keep_their_reason_and_bugs_propagate(manager: CheckpointManager):
    def denied(directory: Path) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(directory / "optimizer.pt"))

    with pytest.raises(CheckpointError, match=r"step-00000001: \[Errno 13\] Permission denied: '.*optimizer.pt'$"):
        manager.save(1, denied)

    def bug(directory: Path) -> None:  # a RuntimeError that is not a serializer's I/O report
        raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        manager.save(1, bug)
    assert manager.list() == []


def test_format_bytes():
    assert [format_bytes(n) for n in (0, 1023, 1024, 12_900_000, 3 * 2**30)] == [
        "0 bytes", "1023 bytes", "1.0 KiB", "12.3 MiB", "3.0 GiB"]
