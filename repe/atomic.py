"""Writes that never leave a partial file or folder behind, and never destroy what they replace until
the replacement is complete.

* :func:`atomic_file` / :func:`write_text` / :func:`write_bytes`: a file is written under a unique
  temporary name in the same folder and renamed over the target (``os.replace`` is atomic on one file
  system); on any failure the temporary file is removed and the previous file is untouched.
* :func:`replace_dir`: a folder is built as a unique temporary sibling and swapped in by two renames (the
  old one aside, the new one into place), so readers see the old folder or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on failure it is gone."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes the file private (0600); give it the mode the file had, else 0644
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def temp_dir_beside(target: str | os.PathLike[str]) -> Path:
    """A new, unique, empty folder next to ``target`` (same file system, so a rename can move it)."""
    t = Path(target)
    t.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".tmp", dir=t.parent))


def replace_dir(built: Path, target: str | os.PathLike[str]) -> Path:
    """Move the finished folder ``built`` to ``target``, replacing what is there only once ``built`` is
    complete. The caller decides beforehand whether replacing ``target`` is allowed."""
    t = Path(target)
    aside: Path | None = None
    if t.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{t.name}.", suffix=".old", dir=t.parent))
        aside.rmdir()
        os.replace(t, aside)
    try:
        os.replace(built, t)
    except BaseException:
        if aside is not None:
            os.replace(aside, t)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return t
