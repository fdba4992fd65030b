"""`medvl-engine score` and `medvl-engine demo` end to end: both answer layouts, the scored jsonl, the
table, and clear errors for bad answer files and datasets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medvl_engine import grading
from medvl_engine.cli import main as cli
from medvl_engine.data import bundled_answers_path, load_bundled
from medvl_engine.rewards import sample_columns
from medvl_engine.scoring import write_jsonl
from medvl_engine.tables import accuracy_table

BUNDLED_ANSWERS = [json.loads(line) for line in bundled_answers_path().read_text(encoding="utf-8").splitlines()]


def _write(path: Path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("mode", ["reward", "eval", "regrade"])
def test_score_bundled_answers_matches_the_reference_grader(tmp_path, capsys, mode):
    scored_path, table_path = tmp_path / "scored.jsonl", tmp_path / "table.json"
    rc = cli(["score", str(bundled_answers_path()), "--mode", mode, "--output", str(scored_path),
              "--table-json", str(table_path), "--threads", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"scored 37 responses to 37 of 37 questions of bundled (mode: {mode})" in out
    assert "| PMC " in out and "| Avg." in out

    rows = _read_jsonl(scored_path)
    assert [r["dataset_index"] for r in rows] == [a["dataset_index"] for a in BUNDLED_ANSWERS]
    samples = load_bundled()
    by_index = samples.by_index()
    answers, labels, options = sample_columns([by_index[r["dataset_index"]] for r in rows])
    reference = grading.score([a["response"] for a in BUNDLED_ANSWERS], answers, labels, options, mode=mode)
    assert [r["correct"] for r in rows] == reference.correct.tolist()
    assert [r["format_ok"] for r in rows] == reference.format_ok.tolist()
    assert [r["parsed"] for r in rows] == reference.parsed
    assert [r["reward"] for r in rows] == reference.reward.tolist()
    for row in rows:
        sample = by_index[row["dataset_index"]]
        assert (row["dataset_name"], row["answer_label"], row["answer"]) == (sample.dataset_name, sample.answer_label,
                                                                             sample.answer)
        assert row["mode"] == mode

    table = json.loads(table_path.read_text())
    expected = accuracy_table((r["dataset_name"], r["correct"]) for r in rows)
    assert table["mode"] == mode and table["average"] == pytest.approx(expected.average)
    assert table["columns"] == ["PMC", "MMMU", "MedX-M", "PathVQA", "SLAKE", "VQA-Rad", "GBaker/MedQA-USMLE-4-options",
                                "Avg."]
    assert expected.to_markdown() in out


def test_modes_differ_where_medvlthinker_says_they_do(tmp_path, capsys):
    by_mode = {}
    for mode in ("reward", "eval", "regrade"):
        output = tmp_path / f"{mode}.jsonl"
        assert cli(["score", str(bundled_answers_path()), "--mode", mode, "--output", str(output)]) == 0
        by_mode[mode] = {r["dataset_index"]: r for r in _read_jsonl(output)}
    capsys.readouterr()
    response = {a["dataset_index"]: a["response"] for a in BUNDLED_ANSWERS}
    # A trailing newline fails the reward's format gate; evaluation strips it.
    assert response[5].endswith("</answer>\n")
    assert by_mode["reward"][5]["reward"] == 0.0 and by_mode["eval"][5]["correct"]
    # A multi-line answer body: the reward's single-line regex misses it, evaluation's DOTALL one finds it.
    assert "<answer>\nC\n</answer>" in response[8]
    assert by_mode["reward"][8]["format_ok"] and not by_mode["reward"][8]["correct"] and by_mode["eval"][8]["correct"]
    # "Answer: A" without tags: only the regrader reads it.
    assert response[28] == "Answer: A"
    assert not by_mode["eval"][28]["correct"] and by_mode["regrade"][28]["correct"]
    # Two answer blocks: the first counts for reward and eval, the last for the regrader.
    assert [by_mode[m][33]["parsed"] for m in ("reward", "eval", "regrade")] == ["B", "B", "C"]


def test_eval_results_layout(tmp_path, capsys):
    good, bad = "<think> x </think>\n<answer> {} </answer>", "I am not sure."
    lines = [
        {"dataset_index": 0, "dataset_name": "pmc_vqa", "prompts": "...",
         "parsed_outputs": [{"output_text": good.format("B")}, {"output_text": good.format("A")},
                            {"output_text": good.format("Right lower zone")}]},
        {"dataset_index": 16, "parsed_outputs": [{"output_text": bad}, {"output_text": good.format("D")}]},
        {"dataset_index": 17, "parsed_outputs": [{"output_text": good.format("No")}]},
    ]
    output = tmp_path / "regraded.jsonl"
    assert cli(["score", _write(tmp_path / "eval_results.jsonl", lines), "--output", str(output)]) == 0
    out = capsys.readouterr().out
    assert "scored 6 responses to 3 of 37 questions of bundled (mode: regrade)" in out
    rows = _read_jsonl(output)
    assert rows[0]["prompts"] == "..." and rows[0]["num_rollouts"] == 3 and rows[0]["num_correct"] == 2
    assert [o["pred_letter"] for o in rows[0]["parsed_outputs"]] == ["B", "A", "B"]
    assert [o["is_correct"] for o in rows[0]["parsed_outputs"]] == [True, False, True]
    assert rows[1]["parsed_outputs"][0]["pred_letter"] == bad  # no option matched: the raw prediction
    assert rows[1]["average_num_correct"] == 0.0 and rows[2]["average_num_correct"] == 1.0
    # PMC: one question at 2/3; PathVQA: questions at 0 and 1; Avg. = mean of 66.67 and 50.00.
    assert "| accuracy (%) | 66.67 |   50.00 | 58.33 |" in out


def test_several_lines_for_one_question_average_per_question(tmp_path, capsys):
    lines = [{"dataset_index": 26, "response": "Yes"}, {"dataset_index": 26, "response": "No"},
             {"dataset_index": 27, "response": "No"}]
    assert cli(["score", _write(tmp_path / "answers.jsonl", lines), "--mode", "eval"]) == 0
    out = capsys.readouterr().out
    assert "scored 3 responses to 2 of 37 questions of bundled (mode: eval)" in out
    # VQA-Rad: question 26 at 1/2 and question 27 at 1/1 -> 75%, not 2 of 3 lines.
    assert "| accuracy (%) |   75.00 | 75.00 |" in out



def test_a_lone_surrogate_is_scored_and_written(tmp_path, capsys):
    """A response cut inside a UTF-16 pair holds a lone surrogate: a valid str that has no UTF-8 form. It is
    scored like any other text, and its line is written with the surrogate escaped, reading back equal."""
    responses = ["<think> x </think>\n<answer> B </answer>", "<think> \ud800 </think>\n<answer> B\ud800 </answer>",
                 "<think> \udfff </think>\n<answer> B </answer>"]
    lines = [{"dataset_index": 0, "response": r} for r in responses] + [{"dataset_index": 1, "response": "A"}]
    output = tmp_path / "scored.jsonl"
    output.write_text("the previous scores\n")
    assert cli(["score", _write(tmp_path / "answers.jsonl", lines), "--mode", "reward", "--output", str(output)]) == 0
    assert "scored 4 responses" in capsys.readouterr().out
    output.read_bytes().decode("utf-8")  # strict UTF-8: the surrogates are escaped
    rows = _read_jsonl(output)
    assert [r["response"] for r in rows] == [line["response"] for line in lines]
    samples = load_bundled().by_index()
    answers, labels, options = sample_columns([samples[r["dataset_index"]] for r in rows])
    reference = grading.score([r["response"] for r in rows], answers, labels, options, mode="reward")
    assert [r["correct"] for r in rows] == reference.correct.tolist()
    assert [r["parsed"] for r in rows] == reference.parsed and rows[1]["parsed"] == "B\ud800"
    assert [r["format_ok"] for r in rows] == [True, True, True, False]


def test_a_failed_write_keeps_the_previous_output(tmp_path, monkeypatch):
    output = tmp_path / "scored.jsonl"
    output.write_text("the previous scores\n")
    dumps = json.dumps

    def fail_on_the_fourth_row(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("dataset_index") == 3:
            raise RuntimeError("disk full")
        return dumps(obj, *args, **kwargs)

    monkeypatch.setattr(json, "dumps", fail_on_the_fourth_row)
    with pytest.raises(RuntimeError, match="disk full"):
        write_jsonl(output, [{"dataset_index": i, "response": "B"} for i in range(6)])
    monkeypatch.undo()
    assert output.read_text() == "the previous scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scored.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: not valid JSON (Expecting property name enclosed in double quotes: column 2)"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ({"response": "A"}, "line 2: missing field 'dataset_index'"),
        ({"dataset_index": "3", "response": "A"}, "line 2: field 'dataset_index' must be an integer, got '3'"),
        ({"dataset_index": 3}, "line 2: missing field 'response' (or 'parsed_outputs' for eval_results.jsonl)"),
        ({"dataset_index": 3, "response": None}, "line 2: field 'response' must be a string, got NoneType"),
        ({"dataset_index": 3, "parsed_outputs": []}, "line 2: field 'parsed_outputs' must be a non-empty list"),
        ({"dataset_index": 3, "parsed_outputs": [{"output_text": "A"}, {"text": "B"}]},
         "line 2: field 'parsed_outputs'[1].output_text must be a string"),
        ({"dataset_index": 99, "response": "A"}, "line 2: dataset_index 99 is not in bundled (37 questions)"),
    ],
)
def test_bad_answer_lines(tmp_path, capsys, line, message):
    path = _write(tmp_path / "answers.jsonl", [{"dataset_index": 0, "response": "B"}, line])
    assert cli(["score", path]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"medvl-engine score: error: {path}: {message}"), err


def test_missing_and_empty_answer_files(tmp_path, capsys):
    assert cli(["score", str(tmp_path / "absent.jsonl")]) == 2
    assert "absent.jsonl: answers file not found" in capsys.readouterr().err
    assert cli(["score", _write(tmp_path / "empty.jsonl", [""])]) == 2
    assert "empty.jsonl: no answers (the file is empty)" in capsys.readouterr().err


def test_bad_dataset_and_skip_invalid(tmp_path, capsys):
    rows = [json.loads(line) for line in (bundled_answers_path().parent / "questions.jsonl").read_text().splitlines()]
    rows[1]["answer_label"] = "Z"
    for row in rows:
        row["images"] = []  # the copy lives away from the bundled images
    dataset = _write(tmp_path / "questions.jsonl", rows)
    answers = _write(tmp_path / "answers.jsonl", [{"dataset_index": 0, "response": "B"}])
    assert cli(["score", answers, "--source", dataset]) == 2
    err = capsys.readouterr().err
    assert "error: questions.jsonl: row 1 (line 2): field 'answer_label': 'Z' is not among the options" in err

    assert cli(["score", answers, "--source", dataset, "--skip-invalid"]) == 0
    captured = capsys.readouterr()
    assert "questions.jsonl: skipped 1 of 37 rows (row 1: field 'answer_label'" in captured.err
    assert "scored 1 responses to 1 of 36 questions of questions.jsonl" in captured.out

    answers = _write(tmp_path / "answers.jsonl", [{"dataset_index": 1, "response": "B"}])
    assert cli(["score", answers, "--source", dataset, "--skip-invalid"]) == 2
    assert "line 1: dataset_index 1 is not in questions.jsonl (36 questions)" in capsys.readouterr().err


def _medvl_engine(*args: str, **env: str) -> subprocess.CompletedProcess:
    executable = Path(sys.executable).parent / "medvl-engine"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "medvl_engine.cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120, env={**os.environ, **env})


def test_score_command_in_a_subprocess(tmp_path):
    output = tmp_path / "scored.jsonl"
    result = _medvl_engine("score", str(bundled_answers_path()), "--mode", "reward", "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "scored 37 responses to 37 of 37 questions of bundled (mode: reward)" in result.stdout
    assert len(_read_jsonl(output)) == 37


def test_hub_dataset_unreachable_is_a_clear_error():
    # Offline mode makes the hub lookup fail at once instead of retrying the network for ~25 s.
    result = _medvl_engine("score", str(bundled_answers_path()), "--source", "UCSC-VLAA/MedVLThinker-Eval",
                           HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    assert result.stderr.startswith(
        "medvl-engine score: error: UCSC-VLAA/MedVLThinker-Eval[test]: cannot load from the Hugging Face hub"
    ), result.stderr


def test_demo(capsys):
    assert cli(["score-demo"]) == 0
    out = capsys.readouterr().out
    assert "scored 37 responses to 37 of 37 questions of bundled (modes: reward, eval, regrade)" in out
    for mode in ("reward", "eval", "regrade"):
        assert f"| {mode} " in out
    assert "pass the reward's format gate" in out
