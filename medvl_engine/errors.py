"""The error a user can fix: bad inputs, settings or run state, reported as one line by the command line.

`medvl-engine` prints `error: <message>` and exits 2 for a `UserError` (and for ValueError,
FileNotFoundError and FileExistsError, which the config checks and loaders raise); any other exception
is a bug and keeps its traceback. Raise `UserError` where the condition is the user's to fix but no
built-in type says so (a stale build lock, a stream that draws no usable group).
"""

from __future__ import annotations


class UserError(Exception):
    """A condition the user fixes (inputs, settings, files); the message says what and where."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the command kept what it had finished; the message says what was kept and where."""
