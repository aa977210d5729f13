"""Error messages on one line (every command reports bad input as one line)."""
from __future__ import annotations


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when empty)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
