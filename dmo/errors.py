"""One exception type for every user-facing failure.

The CLI turns a :class:`DmoError` into a single line on stderr and exit code 2, so the message must
say what is wrong *and* what to do about it, on one line.
"""

from __future__ import annotations


class DmoError(Exception):
    """A failure caused by the user's input or environment, with an actionable one-line message."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))
