"""The command line's one error handler: a user's mistake is one line `error: ...` and exit 2, Ctrl-C one
line and exit 130, a bug keeps its traceback, and `--debug` / MEDVL_DEBUG=1 show every traceback."""

from __future__ import annotations

import json
import time

import pytest

import medvl_engine.scoring
from medvl_engine.cli import main as cli
from medvl_engine.data import DataError, bundled_answers_path, load_samples
from medvl_engine.errors import AnswerFileError, ConfigError, RunFolderError, UserError
from medvl_engine.scoring import AnswerFileError as ScoringAnswerFileError

ANSWERS = str(bundled_answers_path())


def _one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(f"medvl-engine {command}: error: "), err
    return lines[-1]


def test_a_missing_model_is_one_line_naming_the_flag(tmp_path, capsys):
    assert cli(["eval", "--output", str(tmp_path / "run")]) == 2
    assert "model: is required" in _one_error_line(capsys, "eval")


def test_a_missing_config_file_is_one_line_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert cli(["eval", "--config", str(missing), "--model", "smollm2", "--output", str(tmp_path / "run")]) == 2
    assert f"config file {missing} does not exist" in _one_error_line(capsys, "eval")


def test_a_model_path_that_does_not_exist_says_so(tmp_path, capsys):
    rc = cli(["eval", "--model", str(tmp_path / "no-model"), "--data.source", "bundled", "--output",
              str(tmp_path / "run")])
    assert rc == 2
    line = _one_error_line(capsys, "eval")
    assert f"{tmp_path / 'no-model'}" in line and "does not exist" in line


def test_a_wrong_model_fails_before_a_hub_dataset_is_looked_up(tmp_path, capsys, monkeypatch):
    import medvl_engine.rollout.stream as stream

    def no_load(cfg):
        raise AssertionError("the data loaded before the model was checked")

    monkeypatch.setattr(stream, "load_data", no_load)
    for command in ("eval", "passrate"):
        assert cli([command, "--model", str(tmp_path / "no-model"), "--output", str(tmp_path / "run")]) == 2
        assert "does not exist" in _one_error_line(capsys, command)


def test_an_output_that_is_a_file_says_so(tmp_path, capsys):
    output = tmp_path / "results.txt"
    output.write_text("mine\n")
    assert cli(["eval", "--model", "smollm2", "--data.source", "bundled", "--output", str(output)]) == 2
    assert f"--output {output}: is a file" in _one_error_line(capsys, "eval")
    assert output.read_text() == "mine\n"


def test_answers_that_are_not_utf8_name_the_file(tmp_path, capsys):
    answers = tmp_path / "answers.jsonl"
    answers.write_bytes(b'{"dataset_index": 0, "response": "caf\xe9"}\n')
    assert cli(["score", str(answers)]) == 2
    line = _one_error_line(capsys, "score")
    assert str(answers) in line and "not UTF-8" in line and "0xe9" in line


def test_a_dataset_line_that_is_not_utf8_is_reported_as_its_row(tmp_path):
    path = tmp_path / "q.jsonl"
    good = {"question": "Is it?", "options": {"A": "yes", "B": "no"}, "answer_label": "A", "answer": "yes"}
    path.write_bytes(json.dumps(good).encode() + b"\n" + b'{"question": "\xff"}\n')
    with pytest.raises(DataError, match=r"q.jsonl: row 1 \(line 2\): not UTF-8 text \(byte 0xff"):
        load_samples(path)
    assert len(load_samples(path, skip_invalid=True)) == 1


def test_negative_threads_is_one_line_naming_key_and_value(capsys):
    assert cli(["score", ANSWERS, "--threads", "-1"]) == 2
    assert "threads: must be >= 0, got -1" in _one_error_line(capsys, "score")


def test_an_output_that_is_a_folder_is_one_line_naming_it(tmp_path, capsys):
    assert cli(["score", ANSWERS, "--output", str(tmp_path)]) == 2
    assert str(tmp_path) in _one_error_line(capsys, "score")


def test_bundled_is_a_data_source_name_for_every_loader():
    assert load_samples("bundled").name == "bundled"
    assert len(load_samples("bundled")) == 37


def test_a_hub_name_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    start = time.monotonic()
    assert cli(["score", ANSWERS, "--source", "someone/no-such-set"]) == 2
    assert time.monotonic() - start < 10
    line = _one_error_line(capsys, "score")
    assert "someone/no-such-set[test]" in line and "cannot be reached" in line and "HF_HUB_OFFLINE=1" in line


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(medvl_engine.scoring, "main", interrupted)
    assert cli(["score", ANSWERS]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "medvl-engine score: interrupted"


def test_the_user_errors_keep_their_import_paths_and_stay_valueerrors():
    import medvl_engine.errors as errors
    from medvl_engine.data.sample import DataError as SampleDataError

    assert SampleDataError is DataError is errors.DataError
    assert ScoringAnswerFileError is AnswerFileError
    for error in (ConfigError, DataError, AnswerFileError):
        assert issubclass(error, UserError) and issubclass(error, ValueError)
    assert issubclass(RunFolderError, UserError) and not issubclass(RunFolderError, ValueError)


def test_a_user_error_is_one_line_and_debug_shows_its_traceback(monkeypatch, capsys):
    def fails(args):
        raise UserError("the lock /tmp/x is stale")

    monkeypatch.setattr(medvl_engine.scoring, "main", fails)
    assert cli(["score", ANSWERS]) == 2
    assert _one_error_line(capsys, "score") == "medvl-engine score: error: the lock /tmp/x is stale"
    with pytest.raises(UserError):
        cli(["--debug", "score", ANSWERS])
    monkeypatch.setenv("MEDVL_DEBUG", "1")
    with pytest.raises(UserError):
        cli(["score", ANSWERS])


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise AttributeError("'NoneType' object has no attribute 'x'")

    monkeypatch.setattr(medvl_engine.scoring, "main", bug)
    with pytest.raises(AttributeError):
        cli(["score", ANSWERS])


def test_a_valueerror_from_inside_a_library_is_a_bug_with_its_traceback(monkeypatch):
    """A plain ValueError is a bug wherever it is raised; numpy's shape error keeps its traceback."""
    import numpy as np

    def broken(args):
        np.zeros((2, 3)).reshape(4)  # a shape bug inside the command

    monkeypatch.setattr(medvl_engine.scoring, "main", broken)
    with pytest.raises(ValueError, match="cannot reshape"):
        cli(["score", ANSWERS])


def test_a_broken_invariant_inside_the_engine_keeps_its_traceback(monkeypatch, capsys):
    """A plain ValueError raised inside medvl_engine (here the scorer's result check, fed a malformed result)
    is a bug, not the user's mistake: it is not turned into a one-line `error:` (the old rule, which called a
    ValueError whose innermost frame was in medvl_engine the user's, did)."""
    import numpy as np

    from medvl_engine.rewards import ScoreResult

    def malformed(responses, samples, **kwargs):
        n = len(responses)  # reward as float64: the engine must return float32
        return ScoreResult(reward=np.zeros(n), correct=np.zeros(n, bool), format_ok=np.zeros(n, bool),
                           parsed=[""] * n, letter=[""] * n)

    monkeypatch.setattr(medvl_engine.scoring, "score_samples", malformed)
    with pytest.raises(ValueError, match=r"ScoreResult.reward must be a float32 array") as raised:
        cli(["score", ANSWERS])
    assert type(raised.value) is ValueError
    assert raised.traceback[-1].frame.f_globals["__name__"] == "medvl_engine.rewards"
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("error", [ConfigError("rollout.n: must be >= 1, got 0"),
                                   DataError("q.jsonl: row 3: field 'options': empty"),
                                   AnswerFileError("answers.jsonl:2: missing field 'dataset_index'"),
                                   RunFolderError("run holds a run with other settings; use another folder")])
def test_every_user_error_type_is_one_line_and_exit_2(monkeypatch, capsys, error):
    def fails(args):
        raise error

    monkeypatch.setattr(medvl_engine.scoring, "main", fails)
    assert cli(["score", ANSWERS]) == 2
    assert _one_error_line(capsys, "score") == f"medvl-engine score: error: {error}"


def _with_output_in_use(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("mine\n")
    return ["curate", "--source", "bundled", "--pass-counts", str(tmp_path / "counts"), "--output",
            str(tmp_path / "out")]


@pytest.mark.parametrize("argv, error, message", [
    (lambda tmp: ["score", ANSWERS, "--threads", "-1"], ConfigError, "threads: must be >= 0, got -1"),
    (lambda tmp: ["score", ANSWERS, "--source", str(tmp / "absent.jsonl")], DataError, "absent.jsonl: file not found"),
    (lambda tmp: ["score", str(tmp / "empty.jsonl")], AnswerFileError, "no answers (the file is empty)"),
    (_with_output_in_use, RunFolderError, "is not empty (pass --overwrite to replace it)"),
])
def test_the_checks_raise_their_type_and_print_one_line(tmp_path, capsys, argv, error, message):
    (tmp_path / "empty.jsonl").write_text("")
    argv = argv(tmp_path)
    with pytest.raises(error) as raised:
        cli(["--debug", *argv])
    assert message in str(raised.value)
    assert cli(argv) == 2
    assert message in _one_error_line(capsys, argv[0])
