"""The one exception type for user errors.

Anything a user can cause (a wrong path, a corrupt artifact, an unreadable image, a prompt that
does not fit) raises :class:`RlensError` with a message that says what to do. The CLI prints that
message on one line and exits 1; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class RlensError(Exception):
    """A user-facing error: its message is printed as is, on one line."""
