"""The `medvl-engine` command: one subcommand per job, each imported only when it runs.

Every subcommand lives in its own module with two functions, `add_arguments(parser)` and
`main(args) -> int`; this file only maps names to modules, so `medvl-engine score` never pays for
DeepSpeed's or SGLang's import.

Errors, by type: a user's mistake (a `medvl_engine.errors.UserError`: a bad setting, dataset row, answers
file or run folder; a missing, existing or unreadable file; input that is not UTF-8 or JSON) prints one line
`medvl-engine COMMAND: error: ...` and exits 2, Ctrl-C prints one line and exits 130; anything else, a plain
ValueError included, is a bug and shows its traceback, and `--debug` (before the command) or MEDVL_DEBUG=1
shows every one.

Logging: `--log-level debug|info|warning|error` (before the command; or MEDVL_LOG_LEVEL; default info)
configures the one stderr handler (`medvl_engine.logs.configure`) before the command is imported; below
debug the third-party libraries keep to errors and draw no progress bars. A command's result is the only
thing on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading

from medvl_engine import __version__, logs
from medvl_engine.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("medvl_engine.demo", "SFT then GRPO on bundled data with the embedded model, evaluated "
             "before and after"),
    "score-demo": ("medvl_engine.score_demo", "score the bundled model answers in all three grading modes"),
    "score": ("medvl_engine.scoring", "score model answers against a dataset and print the accuracy table"),
    "rollout-worker": ("medvl_engine.rollout.worker", "run a rollout worker that streams scored GRPO groups"),
    "keys": ("medvl_engine.transport.keys", "write the CURVE keys that authenticate tcp transport"),
    "sft": ("medvl_engine.trainers.sft", "supervised fine-tuning with DeepSpeed"),
    "grpo": ("medvl_engine.trainers.grpo", "GRPO training with DeepSpeed on the rollout stream"),
    "eval": ("medvl_engine.evals.evaluate", "evaluate a model on medical VQA benchmarks"),
    "passrate": ("medvl_engine.evals.passrate", "estimate per-question pass counts (n samples each)"),
    "curate": ("medvl_engine.evals.curate", "keep questions by pass count and order them by difficulty"),
    "report": ("medvl_engine.evals.report", "compare evaluation runs side by side; a training run's curves"),
    "build-data": ("medvl_engine.databuild.command", "filter, deduplicate, reformat image-caption pairs into VQA"),
    "bench": ("medvl_engine.bench", "run the parser, kernel, transport, rollout and weight-sync benchmarks"),
}


def _top_parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="medvl-engine",
        description="medvl-engine: RL and evaluation engine for medical vision-language models",
        epilog=f"commands:\n{lines}\n\nrun `medvl-engine COMMAND --help` for a command's options",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medvl-engine {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error (or MEDVL_DEBUG=1)")
    parser.add_argument("--log-level", choices=list(logs.LEVELS), default=logs.DEFAULT,
                        help=f"messages on stderr from this level up; debug also lets the libraries' warnings and "
                        f"progress bars through (or {logs.ENV}; default: %(default)s)")
    parser.add_argument("command", choices=sorted(COMMANDS), metavar="COMMAND")
    return parser


def cpu_defaults() -> None:
    """Settings every command gets before torch (and its OpenMP runtime, which reads them once) loads,
    unless the user set them: OpenMP threads wait passively instead of spinning. Generation shares the
    cores with the learner, a worker or the scorer's threads; spinning made `eval --limit 4` on a busy
    2-core machine take 2 min 37 s against 36 s passive."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# What a user fixes, by type: a UserError (ConfigError, DataError, AnswerFileError, RunFolderError; see
# medvl_engine.errors), a missing, existing or unreadable file, and input that is not UTF-8 or JSON. Anything
# else, a plain ValueError included, is a bug and keeps its traceback.
USER_ERRORS = (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               UnicodeDecodeError, json.JSONDecodeError)


def describe(exc: BaseException) -> str:
    """The one line a user error prints: its message, with the file where the exception type leaves it out."""
    if isinstance(exc, UnicodeDecodeError):
        where = _open_file_name(exc)
        byte = exc.object[exc.start:exc.start + 1].hex() if isinstance(exc.object, bytes) else "?"
        return f"{where or 'input'}: not {exc.encoding.upper()} text (byte 0x{byte}: {exc.reason}); convert it to UTF-8"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        # A rename's error is about its target (an output written to a temporary file, then renamed).
        return f"{exc.filename if exc.filename2 is None else exc.filename2}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def _open_file_name(exc: BaseException) -> str | None:
    """The text file being read when `exc` was raised: the innermost frame that holds one open."""
    import io

    tb, found = exc.__traceback__, None
    while tb is not None:
        for value in tb.tb_frame.f_locals.values():
            if isinstance(value, io.TextIOWrapper) and isinstance(getattr(value, "name", None), str):
                found = value.name
        tb = tb.tb_next
    return found


def _stop_now_if_threads_remain(code: int) -> None:
    """After Ctrl-C, exit at once when a worker thread is still busy: the interpreter would join it at exit
    and a generate call in flight on a CPU can take minutes. Whatever was kept is on disk by now."""
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive() and not t.daemon]
    if busy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    own_process = argv is None  # the console script: this process ends when main returns
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("MEDVL_DEBUG", "") not in ("", "0")
    top = _top_parser()
    level = os.environ.get(logs.ENV) or logs.DEFAULT
    level_from = logs.ENV
    while argv and (argv[0] == "--debug" or argv[0].split("=")[0] == "--log-level"):
        if argv[0] == "--debug":
            debug, argv = True, argv[1:]
        elif "=" in argv[0]:
            level, level_from, argv = argv[0].split("=", 1)[1], "--log-level", argv[1:]
        elif len(argv) > 1:
            level, level_from, argv = argv[1], "--log-level", argv[2:]
        else:
            top.error("argument --log-level: expected one argument")
    try:
        level = logs.parse_level(level)
    except ValueError:
        top.error(f"{level_from}: invalid choice {level!r} (choose from {', '.join(logs.LEVELS)})")
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        top.error(f"unknown command {name!r} (choose from {', '.join(COMMANDS)})")
    cpu_defaults()
    logs.configure(level)  # before the command's imports: transformers and datasets read their settings on load
    module_name, help_ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            top.error(f"command {name!r} is not available in this build ({module_name} is missing)")
        raise
    parser = argparse.ArgumentParser(prog=f"medvl-engine {name}", description=help_, allow_abbrev=False)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt as exc:
        if debug:
            raise
        # A command that kept its partial work says so in the interrupt's message.
        print(f"medvl-engine {name}: {str(exc) or 'interrupted'}", file=sys.stderr)
        code = getattr(exc, "exit_code", 130)  # a preempted trainer: 128 + its signal (143 for SIGTERM)
        if own_process:
            _stop_now_if_threads_remain(code)
        return code
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"medvl-engine {name}: error: {describe(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
