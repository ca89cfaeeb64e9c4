"""``olm init``: write a commented starter recipe from a template shipped inside the package.

The templates live in ``olm_cli/templates/*.yaml`` (package data, so an installed olm has them)
and are ordinary recipes: each validates as it stands, and every key carries a short comment.
The first line is the command that runs the file; it is rewritten to name the file written, so
the line olm prints as the next step and the one at the top of the file are the same command.
"""

from __future__ import annotations

import errno
import os
import shlex
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from olm_cli.errors import OlmError, RecipeError
from olm_cli.rundir.atomic import atomic_writer

DEFAULT_TEMPLATE = "scratch"
DEFAULT_OUT = "recipe.yaml"
STDOUT = "-"
RUN_WITH = "# Run with:  "


class OverwriteRefused(OlmError):
    """The destination exists and ``--force`` was not given (a usage error: exit 2)."""

    exit_code = RecipeError.exit_code


@dataclass(frozen=True)
class Template:
    name: str
    summary: str  # the template's second line, without the comment marker
    text: str


def _template_files() -> dict[str, str]:
    folder = resources.files("olm_cli") / "templates"
    return {entry.name.removesuffix(".yaml"): entry.read_text(encoding="utf-8")
            for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def list_templates() -> list[Template]:
    """Every shipped template, by name."""
    found = []
    for name, text in sorted(_template_files().items()):
        lines = text.splitlines()
        summary = lines[1].lstrip("# ").strip() if len(lines) > 1 and lines[1].startswith("#") else ""
        found.append(Template(name, summary, text))
    return found


def template_text(name: str) -> str:
    """The template ``name`` as shipped; RecipeError (exit 2) naming the choices if there is none."""
    files = _template_files()
    if name not in files:
        raise RecipeError(f"--template {name!r}: no such template; choose one of {', '.join(sorted(files))}")
    return files[name]


def run_command(config: str) -> str:
    """The exact command that trains the recipe at ``config`` (quoted for a POSIX shell)."""
    return f"olm train --config {shlex.quote(config)}"


def render(name: str, out: str) -> str:
    """The template with its first line naming the file it is written to."""
    lines = template_text(name).splitlines(keepends=True)
    if lines and lines[0].startswith(RUN_WITH) and out != STDOUT:
        lines[0] = f"{RUN_WITH}{run_command(out)}\n"
    return "".join(lines)


def write_starter(name: str, out: str, *, force: bool = False) -> Path | None:
    """Write template ``name`` to ``out`` (``-``: standard output); return the path written.

    An existing file (or a symlink, even a dangling one) is refused unless ``force``; with it the
    file is replaced by rename, so a symlink there is replaced rather than written through. The
    file appears complete or not at all, with the umask's permissions.
    """
    text = render(name, out)
    if out == STDOUT:
        sys.stdout.write(text)
        return None
    path = Path(out)
    refusal = OverwriteRefused(f"{path}: the file already exists; pass --force to replace it")
    if path.is_dir():
        raise RecipeError(f"--out {path}: is a directory; give a file name such as {path / DEFAULT_OUT}")
    if not force and os.path.lexists(path):
        raise refusal
    if not path.parent.is_dir():
        raise RecipeError(f"--out {path}: the folder {path.parent} does not exist")
    try:
        with atomic_writer(path, overwrite=force) as handle:
            handle.write(text.encode("utf-8"))
    except FileExistsError:
        raise refusal from None  # created while we were writing
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise RecipeError(f"--out {path}: is a directory") from None
        raise OlmError(f"--out {path}: cannot write ({exc.strerror or exc})") from None
    return path
