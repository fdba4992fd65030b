"""One place configures logging: `medvl-engine --log-level` (or MEDVL_LOG_LEVEL) sets the level of every
library logger before the command runs, on stderr, and keeps transformers, huggingface_hub, datasets and
DeepSpeed quiet below debug; stdout keeps only a command's result."""

from __future__ import annotations

import logging
import sys

import pytest

from medvl_engine import logs
from medvl_engine.cli import COMMANDS
from medvl_engine.cli import main as cli


@pytest.fixture(autouse=True)
def restore_logging(monkeypatch):
    """Each test starts from the default configuration and leaves it behind (the level, the libraries' settings)."""
    monkeypatch.delenv(logs.ENV, raising=False)
    yield
    logs.configure(logs.DEFAULT)


@pytest.fixture
def probe_command(monkeypatch):
    """A `probe` command whose library logger says one line at each level and prints its result."""
    module = type(sys)("medvl_engine_probe_command")

    def main(args):
        log = logging.getLogger("medvl_engine.probe")
        log.debug("probe debug line")
        log.info("probe info line")
        log.warning("probe warning line")
        print("the result")
        return 0

    module.add_arguments = lambda parser: None
    module.main = main
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(COMMANDS, "probe", (module.__name__, "log a line at each level"))
    return "probe"


def test_info_is_the_default_and_logs_go_to_stderr_not_stdout(probe_command, capsys):
    assert cli([probe_command]) == 0
    out, err = capsys.readouterr()
    assert out == "the result\n"
    assert "probe info line" in err and "probe warning line" in err and "probe debug line" not in err
    line = next(line for line in err.splitlines() if "probe info line" in line)
    assert " INFO medvl_engine.probe: probe info line" in line


def test_warning_hides_info_and_debug_shows_debug(probe_command, capsys):
    assert cli(["--log-level", "warning", probe_command]) == 0
    err = capsys.readouterr().err
    assert "probe warning line" in err and "probe info line" not in err

    assert cli(["--log-level=debug", probe_command]) == 0
    err = capsys.readouterr().err
    assert "probe debug line" in err and "probe info line" in err

    assert cli(["--log-level", "error", probe_command]) == 0
    assert "probe" not in capsys.readouterr().err


def test_the_environment_sets_the_level_and_the_flag_wins(probe_command, capsys, monkeypatch):
    monkeypatch.setenv(logs.ENV, "WARNING")
    assert cli([probe_command]) == 0
    assert "probe info line" not in capsys.readouterr().err
    assert cli(["--log-level", "info", probe_command]) == 0
    assert "probe info line" in capsys.readouterr().err


def test_a_bad_level_is_a_usage_error(probe_command, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        cli(["--log-level", "loud", probe_command])
    assert exit_.value.code == 2 and "--log-level: invalid choice 'loud'" in capsys.readouterr().err
    monkeypatch.setenv(logs.ENV, "chatty")
    with pytest.raises(SystemExit):
        cli([probe_command])
    assert f"{logs.ENV}: invalid choice 'chatty'" in capsys.readouterr().err


def test_debug_and_log_level_combine_in_any_order(probe_command, capsys):
    assert cli(["--log-level", "warning", "--debug", probe_command]) == 0
    assert "probe info line" not in capsys.readouterr().err


def test_configuring_twice_keeps_one_handler():
    logs.configure("info")
    logs.configure("debug")
    ours = [h for h in logging.getLogger().handlers if isinstance(h, logs._StderrHandler)]
    assert len(ours) == 1 and logs.level_name() == "debug"


def test_transformers_keeps_to_errors_below_debug_and_debug_lets_it_through():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    logs.configure("info")
    assert hf_logging.get_verbosity() == logging.ERROR
    assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    logs.configure("debug")
    assert hf_logging.get_verbosity() <= logging.INFO
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    logs.configure("warning")
    assert hf_logging.get_verbosity() == logging.ERROR


def test_deepspeed_warnings_are_dropped_even_from_a_logger_created_later(capsys):
    logs.configure("info")
    # What DeepSpeed does on import: its own logger, level and handler (on stdout), propagation off.
    deepspeed = logging.getLogger("DeepSpeed")
    handler = logging.StreamHandler(sys.stdout)
    deepspeed.setLevel(logging.WARNING)
    deepspeed.propagate = False
    deepspeed.addHandler(handler)
    try:
        deepspeed.warning("Attempting to get learning rate from scheduler before it has started")
        deepspeed.error("a real DeepSpeed error")
        out = capsys.readouterr().out
        assert "Attempting" not in out and "a real DeepSpeed error" in out
        logs.configure("debug")
        deepspeed.warning("Attempting to get learning rate from scheduler before it has started")
        assert "Attempting" in capsys.readouterr().out
    finally:
        deepspeed.removeHandler(handler)


def test_a_rollout_worker_started_by_the_learner_logs_at_its_level(tmp_path):
    from medvl_engine.rollout.launcher import WorkerProcess

    logs.configure("warning")
    argv = WorkerProcess(["--config", "w.yaml"], log_path=tmp_path / "rollout-0.log").argv
    assert argv[argv.index("--log-level") + 1] == "warning"
    assert argv.index("--log-level") < argv.index("rollout-worker") < argv.index("--config")
