"""The progress helper: a log line with count, rate and ETA at most every interval when stderr is not a
terminal, a tqdm bar on stderr when it is (or when forced), and result lines on stdout either way."""

from __future__ import annotations

import io
import logging
import time

import pytest

from medvl_engine.progress import Progress, choose_mode, format_duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.INFO, logger="medvl_engine.progress")
    return lambda: [r.getMessage() for r in caplog.records if r.name == "medvl_engine.progress"]


def test_log_lines_come_at_most_every_interval_with_rate_and_eta(lines):
    clock = Clock()
    with Progress(20, "eval v0", unit="question", interval_s=10, mode="log", clock=clock) as bar:
        assert lines() == ["eval v0: 0/20 questions done, starting"]
        for _ in range(4):  # 4 questions in 8 s: not yet a line
            clock.now += 2
            bar.update(1)
        assert len(lines()) == 1
        clock.now += 2
        bar.update(1)  # 5 questions in 10 s: 0.5/s, 15 left -> 30 s
        assert lines()[-1] == "eval v0: 5/20 questions (25%), 0.50 questions/s, ETA 0:30"
        bar.set_postfix("2.00 answers/s")
        for _ in range(15):
            clock.now += 1
            bar.update(1)
        assert lines()[-1] == "eval v0: 15/20 questions (75%), 0.75 questions/s, ETA 0:07, 2.00 answers/s"
    assert bar.n == 20
    assert lines()[-1] == "eval v0: 20/20 questions (100%), 0.80 questions/s, 0:25 in all, 2.00 answers/s"
    assert len(lines()) == 4


def test_a_resumed_run_counts_only_new_work_in_the_rate(lines):
    clock = Clock()
    bar = Progress(10, "sft", unit="step", initial=6, interval_s=0, mode="log", clock=clock)
    assert lines() == ["sft: 6/10 steps done, starting"]
    clock.now += 4
    bar.update(2)
    assert lines()[-1] == "sft: 8/10 steps (80%), 0.50 steps/s, ETA 0:04"
    bar.close()
    bar.close()  # nothing new: no second last line
    assert len(lines()) == 2


def test_an_unknown_total_counts_without_eta(lines):
    clock = Clock()
    with Progress(None, "filter_text", unit="row", interval_s=5, mode="log", clock=clock) as bar:
        clock.now += 5
        bar.update(30)
    assert lines()[1:] == ["filter_text: 30 rows, 6.00 rows/s"]


def test_off_writes_nothing_and_still_counts(lines, capsys):
    with Progress(3, "x", enabled=False) as bar:
        bar.update(3)
    assert bar.n == 3 and lines() == [] and capsys.readouterr().err == ""


def test_the_mode_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("MEDVL_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert choose_mode() == "log" and choose_mode(enabled=False) == "off"

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Terminal())
    assert choose_mode() == "bar"
    monkeypatch.setenv("MEDVL_PROGRESS", "log")
    assert choose_mode() == "log"
    monkeypatch.setenv("MEDVL_PROGRESS", "off")
    assert choose_mode() == "off"


def test_the_bar_draws_on_stderr_and_rows_go_to_stdout(monkeypatch, capsys, lines):
    monkeypatch.setenv("MEDVL_PROGRESS", "bar")
    with Progress(4, "grpo", unit="step") as bar:
        for step in range(4):
            bar.update(1)
            bar.write(f"| {step + 1} | 0.5 |")
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"| {k} | 0.5 |" for k in range(1, 5)]
    assert "grpo: 100%" in err and "4/4" in err and "step/s" in err and lines() == []


def test_durations_read_as_clock_times():
    assert [format_duration(s) for s in (0, 7.4, 65, 3600 + 62)] == ["0:00", "0:07", "1:05", "1:01:02"]


def test_a_heartbeat_logs_while_one_long_unit_runs(lines):
    clock = Clock()
    with Progress(4, "grpo", unit="step", interval_s=0.2, mode="log", heartbeat=True, clock=clock):
        clock.now += 30  # the first step waits for the rollout workers to load the model
        deadline = time.monotonic() + 10
        while len(lines()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lines()[1] == "grpo: 0/4 steps (0%), 0.00 steps/s, 0:30 in, ETA ?"
