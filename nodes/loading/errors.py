"""The one error of checkpoint loading, and the helpers that word its messages (shared by the other loaders)."""

from __future__ import annotations

from typing import Sequence


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded. The message names the file, what was found there and what to do."""


def first_line(error: BaseException) -> str:
    """``"KeyError: 'x'"``: a library error's type and first line, for a message that wraps it."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def few(keys: Sequence[str], limit: int = 4) -> str:
    """The first ``limit`` keys and how many more, or "none"."""
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
