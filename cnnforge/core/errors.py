"""The one exception type that reaches users as a one-line message."""

from __future__ import annotations


class CnnforgeError(Exception):
    """A problem the user can fix: the message names the thing and what to do.

    The CLI prints it as one line and exits non-zero; other exceptions are bugs and show a
    traceback only under ``--debug``.
    """


class CnnforgeWarning(UserWarning):
    """Something the user should know that does not stop the job (the CLI prints one line)."""
