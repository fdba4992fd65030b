"""The error a user can fix: bad inputs, settings or run state, reported as one line by the command line.

`medvl-engine` prints `error: <message>` and exits 2 for a `UserError`, for the OS errors of missing,
existing or unreadable files, for input that is not UTF-8 or JSON, and for a ValueError this package
raised (its config checks and loaders; see `medvl_engine.cli.is_user_error`); any other exception, a
ValueError from inside a library included, is a bug and keeps its traceback. Raise `UserError` where the
condition is the user's to fix but no built-in type says so (a stale build lock, a stream that draws no usable group).
"""

from __future__ import annotations


class UserError(Exception):
    """A condition the user fixes (inputs, settings, files); the message says what and where."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the command kept what it had finished; the message says what was kept and where."""
