"""Crash-safe file writes for the run directory, with the permissions the user asked for.

A cron job can be killed at any instruction (kill -9, power loss, a full disk). Every file
the run directory treats as state is therefore replaced, never edited: the new content goes
to a temporary name in the same directory, is flushed and fsynced, and ``os.replace`` swaps
it in. Readers see either the old file or the new one, never a torn mix. The directory is
fsynced afterwards so the rename itself survives a power cut.

Files olm writes honour the process umask (``0o666 & ~umask``), like any Unix tool, so a
serving user in the right group can read a checkpoint. Libraries that write through
``mkstemp``-style temp files (safetensors, hence ``save_pretrained``) create them 0600
whatever the umask; :func:`apply_umask` puts such files back to the mode the user chose.

Three shapes of state, one helper each, used by every writer:

* a file replaced whole: :func:`atomic_writer` (and ``write_bytes/text/json_atomic``);
* a log that only grows (``history.jsonl``): :func:`append_line_durable`;
* a directory written by libraries (a model cache, a merge result): :func:`publishing_directory`
  stages it next to its final name and renames it into place. Checkpoints and releases add a
  manifest, verification and a ``latest`` link on top of the same pieces (:func:`fsync_tree`,
  :func:`replace_symlink`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# Create a fresh file, never through a symlink planted at the temporary name.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: Path) -> None:
    """Persist a directory's entries (creations, renames, deletions) to disk.

    Without this, a file that was fsynced and renamed can still vanish after a power cut
    because the directory block that names it was never written.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush a file that somebody else wrote (e.g. ``torch.save``) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without a window in which files are created too permissively.

    Linux reports it in ``/proc/self/status``. Elsewhere the only way to read it is to set
    another one; we set 0o077 (the strictest) for that instant, so a file another thread
    creates meanwhile is at worst too private, never world-writable.
    """
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    previous = os.umask(0o077)
    os.umask(previous)
    return previous


def umask_mode(*, directory: bool = False) -> int:
    """The permission bits a newly created file (or directory) gets under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def apply_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything below it) the umask's default modes.

    Meant for trees olm has just created, such as a checkpoint before its manifest is written:
    it resets modes that a library chose on its own (0600 safetensors, 0700 ``mkdtemp``
    directories). Symlinks are skipped, never followed.
    """
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    root = Path(path)
    entries = [root]
    if root.is_dir() and not root.is_symlink():
        entries.extend(root.rglob("*"))
    for entry in entries:
        info = entry.lstat()
        if stat.S_ISLNK(info.st_mode):
            continue
        wanted = dir_mode if stat.S_ISDIR(info.st_mode) else file_mode
        if stat.S_IMODE(info.st_mode) != wanted:
            os.chmod(entry, wanted)


@contextlib.contextmanager
def atomic_writer(path: Path, *, overwrite: bool = True) -> Iterator[IO[bytes]]:
    """Write ``path`` through a binary handle; it appears complete on success or not at all.

    The temporary file is created next to ``path`` with ``O_EXCL | O_NOFOLLOW`` (a symlink
    planted at its name is refused, not followed) and the umask's mode. It is fsynced, then
    renamed over ``path``: a symlink *at* ``path`` is replaced by the file, never written
    through. With ``overwrite=False`` an existing ``path`` (a symlink included, even a
    dangling one) raises ``FileExistsError`` and is left untouched, also when it appears
    while we write (the file is published with ``link``, which never replaces).
    On any error the temporary file is removed and ``path`` is as it was.
    """
    # The file is staged by staged_file (created O_EXCL | O_NOFOLLOW, fsynced, renamed or linked).
    with staged_file(path, overwrite=overwrite) as tmp, \
            os.fdopen(os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), "wb") as handle:
        yield handle
        handle.flush()


@contextlib.contextmanager
def staged_file(path: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """:func:`atomic_writer` for libraries that open the file themselves (the GGUF writer).

    Yields a temporary path next to ``path``, already created (empty, with the umask's mode,
    ``O_EXCL | O_NOFOLLOW``) so the library writes into a file of ours. When the block ends
    without error the file is fsynced and renamed to ``path`` (``overwrite=False``: only if
    nothing is there, else ``FileExistsError``); on an error it is removed.
    """
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "file exists", str(path))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # a leftover of a killed process that had our pid; unlink never follows
    os.close(os.open(tmp, _CREATE_FLAGS, 0o666))
    try:
        yield tmp
        fsync_file(tmp)
        if overwrite:
            os.replace(tmp, path)
        else:
            _publish_without_replacing(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _publish_without_replacing(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path`` unless something is there; ``link`` makes the check race-free.

    Filesystems without hard links (some network and FUSE mounts) fall back to a check
    followed by a rename, which is only as safe as nobody creating ``path`` in between.
    """
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new file.

    The temporary name carries the pid so two processes that (wrongly) write the same file
    cannot clobber each other's half-written temp file. On any error the temp file is
    removed and the original is untouched.
    """
    with atomic_writer(path) as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    """Atomically replace ``path`` with UTF-8 ``text`` (recipe.yaml, a rewritten metrics.jsonl)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented, key-sorted JSON (stable diffs, readable by humans)."""
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    write_text_atomic(path, text)


def append_line_durable(path: Path, line: str) -> None:
    """Append ``line`` to a JSON-lines log and fsync it before returning.

    Logs that only grow (eval and release history) are appended, not replaced: rewriting them
    per row would cost their whole size. A crash mid-append leaves at most a torn last line,
    which readers skip; the next append starts a fresh line, so it never glues itself onto a
    torn one and gets lost with it. The first append also fsyncs the directory, so the new
    file's name survives a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        end = handle.seek(0, os.SEEK_END)
        torn = False
        if end:
            handle.seek(end - 1)
            torn = handle.read(1) != b"\n"
        handle.write((("\n" if torn else "") + line.rstrip("\n") + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    if not end:
        fsync_dir(path.parent)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory below ``directory``: libraries (``torch.save``,
    ``save_pretrained``) do not, and a rename only publishes what is already on disk."""
    for dirpath, _dirnames, filenames in os.walk(directory, topdown=False):
        for filename in filenames:
            fsync_file(Path(dirpath) / filename)
        fsync_dir(Path(dirpath))


def replace_symlink(link: Path, target: str | None) -> None:
    """Point ``link`` at ``target`` (relative, so the run directory can move) in one rename.

    Readers see the old target or the new one, never a missing link. ``None`` removes the link.
    The caller fsyncs the directory once its whole change is made, and removes what a killed
    process left: the temporary link is ``.NAME.tmp-PID`` next to ``link``.
    """
    link = Path(link)
    if target is None:
        link.unlink(missing_ok=True)
        return
    link_tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    link_tmp.unlink(missing_ok=True)
    try:
        os.symlink(target, link_tmp)
        os.replace(link_tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            link_tmp.unlink()
        raise


def staging_name(final: Path) -> Path:
    """Where :func:`publishing_directory` stages ``final``: a hidden sibling with a fixed name,
    so whatever a killed writer left there is found and removed by the next one."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


@contextlib.contextmanager
def publishing_directory(final: Path) -> Iterator[Path]:
    """Stage a directory next to ``final``; on success it replaces ``final`` complete, or never.

    Yields an empty staging directory to write into. When the block ends without error, the
    staged tree gets the umask's modes, is fsynced and renamed to ``final`` (an existing
    ``final`` is removed first: a crash in between leaves no ``final`` rather than a mix), and
    the parent directory is fsynced. On an error the staging directory is removed and
    ``final`` is left as it was.
    """
    final = Path(final)
    staged = staging_name(final)
    shutil.rmtree(staged, ignore_errors=True)  # a killed writer's leftover
    final.parent.mkdir(parents=True, exist_ok=True)
    staged.mkdir()
    try:
        yield staged
        apply_umask(staged)  # safetensors writes 0600; a serving user must be able to read it
        fsync_tree(staged)
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif os.path.lexists(final):
            final.unlink()
        os.replace(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    fsync_dir(final.parent)
