"""Confining untrusted file names to their folder.

Workflows and HTTP requests are untrusted: a file name taken from one must not reach outside the folder it names a
file in, by ``..``, by an absolute path, by a backslash or NUL, or through a symlink that points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path


class UnsafePath(ValueError):
    """A file name that would leave its folder."""


def safe_join(root: str | os.PathLike, name: str) -> Path:
    """``root / name``, refused unless it stays inside ``root`` once symlinks are resolved."""
    if not isinstance(name, str) or not name:
        raise UnsafePath("a file name is required")
    if "\x00" in name or "\\" in name:
        raise UnsafePath(f"{name!r}: backslashes and NUL characters are not allowed in file names")
    if name.startswith("/") or os.path.isabs(name) or (len(name) > 1 and name[1] == ":"):
        raise UnsafePath(f"{name!r}: absolute paths are not allowed; name a file inside the folder")
    if any(part == ".." for part in name.split("/")):
        raise UnsafePath(f"{name!r}: '..' is not allowed in file names")
    base = Path(root).resolve()
    target = (base / name).resolve()
    if target != base and base not in target.parents:
        raise UnsafePath(f"{name!r} leads outside its folder (through a symbolic link)")
    return target


def list_files(root: str | os.PathLike, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files below ``root`` (relative names with '/'), optionally only those with the given suffixes; files that
    resolve outside ``root`` are left out."""
    base = Path(root)
    if not base.is_dir():
        return []
    resolved = base.resolve()
    out = []
    for path in sorted(base.rglob("*")):
        if path.name.startswith(".") or not path.is_file():
            continue
        if suffixes and path.suffix.lower() not in suffixes:
            continue
        real = path.resolve()
        if resolved in real.parents:
            out.append(path.relative_to(base).as_posix())
    return out
