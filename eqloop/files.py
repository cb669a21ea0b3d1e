"""Atomic file writing: every file eqloop produces appears whole or not at all.

A file is written to a hidden temporary sibling (``.<name>-XXXX``) and renamed over the
target with ``os.replace``, which is atomic on POSIX and Windows, so a crash or a kill
never leaves a half-written file under the final name. A directory of several files is
written the same way: into a hidden staging sibling, then swapped in with
:func:`replace_directory`. Permissions follow the user's umask, as for any file the
user's tools create (``tempfile`` would make it private). JSON files are read with
:func:`read_json`, whose errors name the file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "STAGING_PREFIX",
    "atomic_path",
    "jsonl_records",
    "read_json",
    "replace_directory",
    "staged_directory",
    "umask_mode",
    "write_bytes_atomic",
    "write_figure_atomic",
    "write_json_atomic",
    "write_text_atomic",
]

STAGING_PREFIX = "."
"""Temporary siblings are named ``.<target name>-<random>`` (hidden, never the target)."""


def umask_mode(directory: bool = False) -> int:
    """The mode a new file (0o666) or directory (0o777) gets under the current umask."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``; renamed onto it when the block exits cleanly.

    The parent directory is created if needed. On an exception the temporary file is
    removed and ``path`` is left as it was.

    Example:
        >>> with atomic_path("plot.png") as tmp:    # doctest: +SKIP
        ...     figure.savefig(tmp)
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f"{STAGING_PREFIX}{target.stem}-", suffix=target.suffix, dir=target.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, umask_mode())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented, key-sorted JSON (with a final newline) atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_figure_atomic(path: str | os.PathLike[str], figure: Any, **options: Any) -> None:
    """Save a matplotlib figure to ``path`` atomically (the caller still closes it).

    Args:
        path: the image file; its suffix picks the format (``.png`` unless another one is
            given, e.g. ``.svg``; a path without a suffix is written as PNG).
        figure: a ``matplotlib.figure.Figure``.
        **options: keywords of ``Figure.savefig`` (``dpi``, ``bbox_inches``, ...).
    """
    options.setdefault("format", Path(path).suffix.lstrip(".") or "png")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, **options)


def read_json(path: str | os.PathLike[str]) -> Any:
    """The parsed contents of a JSON file (UTF-8).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8 or not valid JSON (the message names the file,
            and the line and column of a syntax error).
    """
    file = Path(path)
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None


def replace_directory(staging: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Put the complete directory ``staging`` in place of ``target`` with renames.

    ``staging`` must be a sibling of ``target`` (same file system). When ``target`` does
    not exist this is one atomic rename. Otherwise the old directory is first renamed to a
    hidden sibling ``.<name>-old-XXXX/<name>``, then ``staging`` to ``target``, then the
    old copy is deleted: a kill at any point leaves ``target`` either the old or the new
    directory, except between the two renames, when ``target`` is absent and the old
    directory is still whole in the hidden sibling (:func:`eqloop.models.load` says so).
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{target.name}-old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """A hidden, empty staging sibling of ``target`` that replaces it when the block exits.

    The block writes the whole directory into the staging one; on a clean exit it takes
    ``target``'s place with :func:`replace_directory`. On an exception (or a kill) it is
    removed (or left hidden) and ``target`` stays as it was. The parent directory is
    created if needed; the directory keeps the permissions of the one it replaces, or
    gets the user's umask permissions.

    Example:
        >>> with staged_directory("out/model") as staging:    # doctest: +SKIP
        ...     write_json_atomic(staging / "config.json", config)
    """
    final = Path(target)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{final.name}-", dir=final.parent))
    try:
        mode = final.stat().st_mode & 0o7777 if final.is_dir() else umask_mode(directory=True)
        os.chmod(staging, mode)  # mkdtemp makes it private
        yield staging
        replace_directory(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def jsonl_records(
    file: Path, text: str | bytes | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(path:line, object)`` for every non-blank line of a JSONL file.

    Args:
        file: the file; named in every error.
        text: its contents, if already read (bytes are decoded as UTF-8).

    Raises:
        ValueError: the file is not UTF-8, a line is not JSON or not a JSON object (the
            message starts with ``path:line``).
    """
    try:
        if text is None:
            text = file.read_text(encoding="utf-8")
        elif isinstance(text, bytes):
            text = text.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record
