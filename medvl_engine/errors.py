"""The errors a user can fix: bad inputs, settings or run state, reported as one line by the command line.

`medvl-engine` prints `error: <message>` and exits 2 for a `UserError`, for the OS errors of missing,
existing or unreadable files and for input that is not UTF-8 or JSON; any other exception, a plain
ValueError included (a broken invariant, a shape mismatch in numpy or torch), is a bug and keeps its
traceback. The type says whose fault an error is, so raise the one that fits:

- `ConfigError`: a setting or flag is wrong (a config check, a flag value, a missing required setting).
- `DataError`: an input dataset (a row, a field, the source itself) does not fit the unified schema.
- `AnswerFileError`: an answers or results file given to `medvl-engine score` is wrong.
- `RunFolderError`: a run or output folder is in the wrong state (it exists without --overwrite, its
  manifest does not match, a resume with changed settings, nothing to resume).
- `UserError` itself: the user's to fix but none of the above (a stale build lock, a stream that draws
  no usable group).

`ConfigError`, `DataError` and `AnswerFileError` are also ValueErrors, so `except ValueError` around a
check keeps catching them. A check of something only a bug in this package can produce stays a
ValueError or RuntimeError.
"""

from __future__ import annotations


class UserError(Exception):
    """A condition the user fixes (inputs, settings, files); the message says what and where."""


class ConfigError(UserError, ValueError):
    """A setting or flag is wrong; the message names the key (or flag) and the value."""


class DataError(UserError, ValueError):
    """A row of a dataset does not fit the unified schema; the message names the dataset, row and field."""


class AnswerFileError(UserError, ValueError):
    """The answers file does not fit either layout; the message names the file, line and field."""


class RunFolderError(UserError):
    """A run or output folder is in the wrong state for this command; the message names the folder and the fix."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the command kept what it had finished; the message says what was kept and where."""
