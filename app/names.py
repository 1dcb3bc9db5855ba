"""User-given file names, made safe before they touch the server's file system.

A name typed in the app (``/abs/x``, ``../x``, ``..``, ``a/b``, control characters) must never make
the server write outside the folder it was meant for. :func:`safe_name` keeps only a base name of
letters, digits, ``.``, ``_`` and ``-`` (no leading dot), and :func:`inside` joins it onto a folder and
checks that the result stays there.
"""

from __future__ import annotations

import re
from pathlib import Path

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "steering", max_len: int = 100) -> str:
    """A file-name stem that is safe on any file system: the last path component of ``name`` with
    unsafe characters replaced by ``_``, leading dots removed; ``default`` when nothing is left."""
    base = re.split(r"[\\/]", name.strip())[-1]
    cleaned = _UNSAFE.sub("_", base).lstrip(".")[:max_len].strip("_")
    return cleaned or default


def inside(folder: str | Path, name: str) -> Path:
    """``folder / safe_name(name)``, refusing (ValueError) anything that would resolve outside."""
    root = Path(folder).resolve()
    out = (root / safe_name(name)).resolve()
    if out.parent != root:
        raise ValueError(f"file name {name!r} is not allowed")
    return out
