"""The pure-Python reference (medvl_engine.grading) against hand-written facts of MedVLThinker's rules."""

from __future__ import annotations

import numpy as np
import pytest

from medvl_engine import grading

THINK = "<think>the lesion is bright</think>"


@pytest.mark.parametrize(
    ("response", "ok"),
    [
        (f"{THINK}\n<answer> B </answer>", True),
        (f"{THINK}<answer>B</answer>", True),
        ("<think></think><answer></answer>", True),
        (f"{THINK}\n<answer> B </answer>\n", False),  # a trailing newline breaks the fullmatch
        (f" {THINK}<answer>B</answer>", False),  # so does leading whitespace
        (f"{THINK}so<answer>B</answer>", False),  # only whitespace between the blocks
        ("<think>a</think><think>b</think><answer>X</answer>", True),  # lazy bodies span extra tags
        (f"{THINK}<answer>A</answer><answer>B</answer>", True),
        (f"{THINK}\u3000\u00a0\n\t<answer>B</answer>", True),  # \s is Unicode whitespace
        ("<think>a\nb</think>\n<answer>\nB\n</answer>", True),  # DOTALL bodies
        ("<answer>B</answer>", False),
        (f"{THINK}<answer>B</answer >", False),
    ],
)
def test_format_gate(response, ok):
    assert grading.format_ok(response) is ok


@pytest.mark.parametrize(
    ("response", "prediction"),
    [
        (f"{THINK}\n<answer> B </answer>", "B"),
        (f"{THINK}<answer>\nB\n</answer>", f"{THINK}<answer>\nB\n</answer>"),  # multi-line body: whole response
        (f"{THINK}<answer>A</answer><answer>B</answer>", "A"),  # the first block
        (f"{THINK}<answer>\nA</answer><answer> C </answer>", "C"),  # first one without a newline inside
        ("<answer>B\r</answer>", "B"),  # `.` matches "\r"
        ("  no tags here \n", "no tags here"),
    ],
)
def test_reward_extraction(response, prediction):
    assert grading.extract_reward(response) == prediction


@pytest.mark.parametrize(
    ("response", "prediction"),
    [
        ("  B \n", "B"),
        (f"{THINK}<answer>\nB\n</answer>", "B"),  # DOTALL here
        ("<answer> A </answer> <answer>B</answer>", "A"),
        ("<answer> A", "<answer> A"),
    ],
)
def test_eval_extraction(response, prediction):
    assert grading.extract_eval(response) == prediction


@pytest.mark.parametrize(
    ("response", "prediction"),
    [
        ("<answer>A</answer> then <answer>\n C \n and more</answer>", "C"),  # last block, first line
        ("<answer>   </answer>", ""),
        ("reasoning\nAnswer: C\nmore text", "C"),
        ("answer: A\nANSWER:   b  \nrest", "b"),  # last match, IGNORECASE
        ("answer:\n\nanswer: B", "answer: B"),  # \s* crosses newlines before the group
        ("So the answer is B", "B"),
        ("the answer is: D.", "D."),
        ("It is: A", "A"),
        ("anſwer: B", "B"),  # U+017F matches `s` under IGNORECASE
        ("<think>B</think>", "B"),  # tags removed last
        ("<thi<think>nk>B", "<think>B"),  # one replace pass per tag, in order
        ("  plain text  ", "plain text"),
    ],
)
def test_regrade_extraction(response, prediction):
    assert grading.extract_regrade(response) == prediction


@pytest.mark.parametrize(
    ("prediction", "correct"),
    [
        ("B", True),
        ("b", True),
        (" b ", True),
        ("hyperdense", True),
        ("B. Hyperdense", True),
        ("b. hyperdense", True),
        ("(B)", False),
        ("B.", False),
        ("**B**", False),
        ("Option B", False),
        ("B:Hyperdense", False),
        ("B.  Hyperdense", False),
    ],
)
def test_grade_answer(prediction, correct):
    assert grading.grade_answer(prediction, "Hyperdense", "B") is correct


def test_grade_answer_unicode():
    assert grading.grade_answer("MÉNIÈRE", "ménière", "A")
    assert grading.grade_answer("\u3000ménière\u00a0", "Ménière", "A")  # ideographic space, no-break space
    # Final sigma: a capital sigma ending a word lowers to "ς", elsewhere to "σ".
    assert grading.grade_answer("ΟΔΟΣ", "οδος", "A")
    assert grading.grade_answer("ΟΔΟΣ", "οδοσ", "A") is False
    assert grading.grade_answer("ΣΑ", "σα", "A")
    assert grading.grade_answer("İ", "i\u0307", "A")  # full lowercase: two code points


def test_score_reward_mode_gates_on_format():
    result = grading.score([f"{THINK}<answer>B</answer>", "B", f"{THINK}<answer>A</answer>"], ["x"] * 3, ["B"] * 3)
    np.testing.assert_array_equal(result.reward, np.array([1.0, 0.0, 0.0], dtype=np.float32))
    np.testing.assert_array_equal(result.correct, [True, True, False])
    np.testing.assert_array_equal(result.format_ok, [True, False, True])
    assert result.parsed == ["B", "B", "A"]
    assert result.letter == ["B", "B", ""]  # no options: the label when correct


def test_score_letters_from_options():
    options = {"A": "Yes", "B": "No", "C": "no"}
    result = grading.score(["no", "<answer>c</answer>", "maybe"], ["No"] * 3, ["B"] * 3, [options] * 3, mode="eval")
    assert result.letter == ["B", "C", ""]  # "no" hits B before C (first in order); "c" is C's label
    np.testing.assert_array_equal(result.correct, [True, False, False])


def test_score_bad_input():
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        grading.score(["a", None], ["x", "x"], ["A", "A"])
    with pytest.raises(ValueError, match="answers has 1 items"):
        grading.score(["a", "b"], ["x"], ["A", "A"])
    with pytest.raises(ValueError, match="row 0"):
        grading.score(["a"], ["x"], ["E"], [{"A": "x"}])
    with pytest.raises(ValueError, match="unknown mode"):
        grading.score(["a"], ["x"], ["A"], mode="strict")
