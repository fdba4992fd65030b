"""Logging for every command: one handler on stderr, one level, and the third-party libraries kept quiet.

    from medvl_engine import logs
    logs.configure("info")      # what `medvl-engine --log-level info COMMAND` does before COMMAND runs

Library modules log through `logging.getLogger(__name__)` and configure nothing; a command's result (a
table, a report, YAML) is the only thing it prints to stdout. Below `debug`, transformers, huggingface_hub,
datasets and DeepSpeed keep to errors and draw no progress bars: their "Loading weights" bars and
DeepSpeed's "Attempting to get learning rate from scheduler before it has started" would otherwise land
between the rows of a table (DeepSpeed's handler even writes to stdout). `debug` lets all of it through.

A library imported later is quieted too: configure() sets the environment variables that transformers
and datasets read when they load (unless the user set them), and filters DeepSpeed's logger by name,
which survives the handler and level DeepSpeed installs on import.
"""

from __future__ import annotations

import logging
import os
import sys

from medvl_engine.errors import ConfigError

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
ENV = "MEDVL_LOG_LEVEL"
DEFAULT = "info"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"

# Read by transformers and datasets when they load; set only while quiet, and only where the user did not.
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}

_state: dict = {"level": None, "env": set()}


def parse_level(text: str | None) -> str:
    """The level name of `text` (any case); ValueError naming the choices otherwise."""
    name = (text or "").strip().lower()
    if name not in LEVELS:
        raise ConfigError(f"log level {text!r}: choose from {', '.join(LEVELS)}")
    return name


def level_name() -> str:
    """The level this process configured, else $MEDVL_LOG_LEVEL, else info (what a child process should get)."""
    if _state["level"]:
        return _state["level"]
    try:
        return parse_level(os.environ.get(ENV) or DEFAULT)
    except ValueError:
        return DEFAULT


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (a test's capture may have replaced it since)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _AtLeast(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


_DEEPSPEED_FILTER = _AtLeast(logging.ERROR)


def configure(level: str = DEFAULT) -> str:
    """Send log records to stderr at `level` (debug, info, warning, error) and quiet the third-party
    libraries below debug. Safe to call again: the handler is replaced, not added twice. Returns the level."""
    name = parse_level(level)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    root.addHandler(handler)
    # Our own records follow `level`; other libraries' loggers reach the same handler through the root,
    # whose level is their threshold: warnings at the default, their INFO lines too at debug.
    logging.getLogger("medvl_engine").setLevel(LEVELS[name])
    root.setLevel(logging.INFO if name == "debug" else max(LEVELS[name], logging.WARNING))
    quiet_third_party(name != "debug")
    _state["level"] = name
    return name


def quiet_third_party(quiet: bool) -> None:
    """Errors only and no progress bars from transformers, huggingface_hub, datasets and DeepSpeed (`quiet`),
    or their own defaults back. Libraries not imported yet are not imported (transformers alone takes 1.5 s)."""
    for key, value in _QUIET_ENV.items():
        if quiet and key not in os.environ:
            os.environ[key] = value
            _state["env"].add(key)
        elif not quiet and key in _state["env"]:
            os.environ.pop(key, None)
            _state["env"].discard(key)

    from huggingface_hub import utils as hub_utils  # light (~60 ms); transformers reads its bar setting on import

    if quiet:
        hub_utils.disable_progress_bars()
    elif hub_utils.are_progress_bars_disabled() and os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is None:
        hub_utils.enable_progress_bars()

    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        if "TRANSFORMERS_VERBOSITY" not in os.environ or "TRANSFORMERS_VERBOSITY" in _state["env"]:
            hf_logging.set_verbosity(logging.ERROR if quiet else logging.INFO)
        (hf_logging.disable_progress_bar if quiet else hf_logging.enable_progress_bar)()

    if "datasets" in sys.modules:
        import warnings

        import datasets

        with warnings.catch_warnings():  # "cannot enable: the environment variable has priority" is fine
            warnings.simplefilter("ignore")
            (datasets.disable_progress_bars if quiet else datasets.enable_progress_bars)()

    deepspeed = logging.getLogger("DeepSpeed")
    if quiet:
        deepspeed.addFilter(_DEEPSPEED_FILTER)
    else:
        deepspeed.removeFilter(_DEEPSPEED_FILTER)
        if "deepspeed" in sys.modules:
            for target in (deepspeed, *deepspeed.handlers):
                target.setLevel(logging.INFO)
