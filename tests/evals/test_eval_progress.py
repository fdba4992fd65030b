"""`eval` and `passrate` show their progress (questions done of all, rate, answers/s) on stderr while
stdout keeps only the result table, so `medvl-engine eval ... > table.md` stays a table."""

from __future__ import annotations

from pathlib import Path

import pytest

from medvl_engine import logs
from medvl_engine.cli import main as cli

ROLLOUT_TESTS = Path(__file__).resolve().parents[1] / "rollout"


class Renderer:
    """Chat template and tokenizer enough for the prompt stream (the scripted backend reads no ids)."""

    chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return "".join(str(m["content"]) for m in messages)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(1, 1 + min(len(text), 50)))}


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.syspath_prepend(str(ROLLOUT_TESTS))
    from scripted_backend import ScriptedBackend

    import medvl_engine.evals.runner as runner

    monkeypatch.setattr(runner, "build_backends",
                        lambda rollout, model, samples=(): ([ScriptedBackend("scripted", delay=0.01)], Renderer()))
    monkeypatch.delenv("MEDVL_PROGRESS", raising=False)
    yield
    logs.configure(logs.DEFAULT)


@pytest.mark.parametrize("command, extra, unit", [("eval", [], "eval v0"), ("passrate", ["--rollout.n", "3"],
                                                                            "passrate")])
def test_progress_goes_to_stderr_and_the_table_alone_to_stdout(tmp_path, capsys, scripted, command, extra, unit):
    (tmp_path / "model").mkdir()
    args = [command, "--model", str(tmp_path / "model"), "--output", str(tmp_path / "run"), "--data.source",
            "bundled", "--data.ignore-images", "--data.max-samples", "6", *extra]
    assert cli(args) == 0
    out, err = capsys.readouterr()

    # stderr (not a terminal here): a start line and a last line with the count, the rate and answers/s.
    assert f"{unit}: 0/6 questions done, starting" in err
    last = next(line for line in err.splitlines() if f"{unit}: 6/6 questions (100%)" in line)
    assert "questions/s" in last and "answers/s" in last and "in all" in last
    assert "6 answered, 0 already done, 0 failed" in err

    # stdout: the result table, nothing of the progress or the log.
    assert "|" in out
    for noise in ("questions/s", "answers/s", "INFO", "starting", "answered"):
        assert noise not in out

    # A second run finds every question done and says so from the start.
    assert cli(args) == 0
    assert f"{unit}: 6/6 questions done, starting" in capsys.readouterr().err
