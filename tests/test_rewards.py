"""The native parser (medvl_engine.rewards) held equal to the pure-Python reference (medvl_engine.grading).

Hand-written edge cases, hypothesis-generated responses built from tag fragments, letters and option
texts, huge and odd inputs, bad input, and the Unicode tables against the running interpreter.
"""

from __future__ import annotations

import re
import time
import unicodedata
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medvl_engine import grading, rewards
from medvl_engine._build import load_native

native = load_native()
same_unicode = pytest.mark.skipif(
    native.UNICODE_VERSION != unicodedata.unidata_version,
    reason=f"tables generated for Unicode {native.UNICODE_VERSION}, this Python has {unicodedata.unidata_version}: "
    "rerun csrc/gen_unicode_tables.py",
)
EVERY_CODE_POINT = "".join(map(chr, range(0x110000)))


def assert_same(got: rewards.ScoreResult, want: rewards.ScoreResult) -> None:
    assert got.parsed == want.parsed
    assert got.letter == want.letter
    np.testing.assert_array_equal(got.correct, want.correct)
    np.testing.assert_array_equal(got.format_ok, want.format_ok)
    np.testing.assert_array_equal(got.reward, want.reward)
    assert got.reward.dtype == np.float32 and got.correct.dtype == np.bool_ and got.format_ok.dtype == np.bool_


def check_all_modes(responses, answers, labels, options=None, threads=(1, 2)):
    for mode in rewards.MODES:
        want = grading.score(responses, answers, labels, options, mode=mode)
        for count in threads:
            assert_same(rewards.score(responses, answers, labels, options, mode=mode, threads=count), want)


OPTIONS = {"A": "Hyperdense", "B": "Hypodense", "C": "Ménière disease", "D": "ΟΔΟΣ"}
T = "<think>reasoning</think>"

# (response, answer, label): each row is checked in every mode against the reference, with OPTIONS.
EDGE_CASES = [
    (f"{T}\n<answer> B </answer>", "Hypodense", "B"),
    (f"{T}\n<answer> B </answer>\n", "Hypodense", "B"),
    (f" {T}<answer>B</answer>", "Hypodense", "B"),
    (f"{T}<answer>\nB\n</answer>", "Hypodense", "B"),
    (f"{T}<answer>A</answer><answer>B</answer>", "Hypodense", "B"),
    (f"{T}<answer>\nA</answer><answer>B</answer>", "Hypodense", "B"),
    ("<think>a</think><think>b</think><answer>B</answer>", "Hypodense", "B"),
    ("<think><answer>A</answer></think><answer>B</answer>", "Hypodense", "B"),
    ("<think></think><answer></answer>", "Hypodense", "B"),
    ("<think></think>\u3000\u00a0\x85\u2028<answer>B</answer>", "Hypodense", "B"),
    (f"{T}<answer>B\r</answer>", "Hypodense", "B"),
    (f"{T}<answer>B\r\n</answer>", "Hypodense", "B"),
    (f"{T}so <answer>B</answer>", "Hypodense", "B"),
    ("<answer>B", "Hypodense", "B"),
    ("B</answer>", "Hypodense", "B"),
    ("<answer><answer>B</answer></answer>", "Hypodense", "B"),
    ("<answer>A</answer> x <answer>\n\n  C \n D</answer>", "Hypodense", "B"),
    ("<answer> \n </answer>", "Hypodense", "B"),
    ("", "Hypodense", "B"),
    ("   \n\t ", "Hypodense", "B"),
    ("B", "Hypodense", "B"),
    ("b", "Hypodense", "B"),
    ("(B)", "Hypodense", "B"),
    ("B.", "Hypodense", "B"),
    ("**B**", "Hypodense", "B"),
    ("Option B", "Hypodense", "B"),
    ("b. hypodense", "Hypodense", "B"),
    ("B.  Hypodense", "Hypodense", "B"),
    ("HYPODENSE", "Hypodense", "B"),
    ("Answer: B\nbecause", "Hypodense", "B"),
    ("answer: A\nANSWER:  b \nrest", "Hypodense", "B"),
    ("answer:\n\n answer: B", "Hypodense", "B"),
    ("answer: A answer: B", "Hypodense", "B"),
    ("So the answer is B", "Hypodense", "B"),
    ("the answer is: B", "Hypodense", "B"),
    ("The answer is\n\nB", "Hypodense", "B"),
    ("It is: B", "Hypodense", "B"),
    ("İs: B", "Hypodense", "B"),
    ("ıs: B", "Hypodense", "B"),
    ("anſwer: B", "Hypodense", "B"),
    ("ANSWER\u0130S: B", "Hypodense", "B"),
    ("<think>B</think>", "Hypodense", "B"),
    ("<thi<think>nk>B", "Hypodense", "B"),
    ("Answer: <answer>B", "Hypodense", "B"),
    ("<answer> MÉNIÈRE DISEASE </answer>", "Ménière disease", "C"),
    ("<answer>c. ménière disease</answer>", "Ménière disease", "C"),
    ("<answer>\u3000ménière disease\u00a0</answer>", "Ménière disease", "C"),
    ("<answer>οδος</answer>", "ΟΔΟΣ", "D"),
    ("<answer>οδοσ</answer>", "ΟΔΟΣ", "D"),
    ("<answer>ΟΔΟΣ</answer>", "ΟΔΟΣ", "D"),
    ("<answer>i\u0307</answer>", "İ", "B"),
    ("<answer>\ud800</answer>", "\ud800", "B"),
    ("<answer>\U0001fac0 B</answer>", "Hypodense", "B"),
    (f"{T}<answer>\U0001d400</answer>", "\U0001d400", "B"),
    ("answer: \udfff\nmore", "\udfff", "A"),
    ("<ANSWER>B</ANSWER>", "Hypodense", "B"),
]


@pytest.mark.parametrize(("response", "answer", "label"), EDGE_CASES)
def test_edge_case(response, answer, label):
    check_all_modes([response], [answer], [label], [OPTIONS | {label: OPTIONS.get(label, answer)}])
    check_all_modes([response], [answer], [label])


def test_edge_cases_as_one_batch():
    responses, answers, labels = zip(*EDGE_CASES)
    check_all_modes(list(responses), list(answers), list(labels), [OPTIONS] * len(EDGE_CASES))


def test_option_letters_first_hit_in_order():
    options = {"A": "yes", "B": "Yes", "C": "a"}
    check_all_modes(["yes", "a", "A", "c", "no"], ["Yes"] * 5, ["B"] * 5, [options] * 5)
    result = rewards.score(["yes", "a", "A", "c", "no"], ["Yes"] * 5, ["B"] * 5, [options] * 5, mode="eval")
    assert result.letter == ["A", "A", "A", "C", ""]


def test_rows_may_lack_options_and_share_objects():
    shared = {"A": "x", "B": "y"}
    options = [shared, shared, None, {"B": "y", "A": "x"}, shared]
    check_all_modes(["A", "y", "B", "x", "z"], ["y"] * 5, ["B"] * 5, options)


def test_empty_batch():
    result = rewards.score([], [], [])
    assert len(result) == 0 and result.reward.dtype == np.float32


# Responses built from tag fragments, tail phrases, letters, option texts and awkward code points.
FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "answer>", "</", "<", ">", "\n", "\r", "\r\n",
    " ", "  ", "\t", "\u00a0", "\u3000", "\x85", "\u2028", "\x1c", "\x0b", "A", "b", "C", "C. ", ". ",
    "Answer:", "answer: ", "answer is", "ANSWER IS: ", "is:", "Is: ", "anſwer:", "İs:", "ıs: ", "The answer is ",
    "Σ", "ΑΣ", "σ", "ς", "'", ".", "\u0345", "İ", "ß", "ẞ", "\ud800", "\udfff", "\U0001fac0", "Ménière", "MÉNIÈRE",
    "hyperdense", "Hyperdense", "B. Hyperdense", "ΟΔΟΣ", "K", "\u212a",
]
TEXTS = ["Hyperdense", "hyperdense", "Ménière", "ΟΔΟΣ", "yes", "Yes", " B ", "İ", "a. b", "", " ", "\ud800", "ſ"]
responses_st = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=3)), max_size=24).map("".join)
text_st = st.one_of(st.sampled_from(TEXTS), st.text(max_size=4))


@st.composite
def rows(draw):
    letters = draw(st.lists(st.sampled_from(["A", "B", "C", "D", "a", " B", "Σ"]), min_size=1, max_size=4, unique=True))
    options = {letter: draw(text_st) for letter in letters}
    label = draw(st.sampled_from(letters))
    answer = draw(st.one_of(st.just(options[label]), text_st))
    return draw(responses_st), answer, label, draw(st.one_of(st.just(options), st.none()))


@settings(max_examples=300, deadline=None)
@given(st.lists(rows(), min_size=1, max_size=6))
def test_generated_batches(batch):
    responses, answers, labels, options = (list(column) for column in zip(*batch))
    check_all_modes(responses, answers, labels, options, threads=(1,))


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40), st.text(max_size=6), st.text(max_size=3))
def test_arbitrary_text(response, answer, label):
    check_all_modes([response], [answer], [label], threads=(1,))


def test_several_megabyte_responses():
    body = "The lesion is hyperdense. " * 200_000  # 5.2 MB
    responses = [
        f"<think>{body}</think>\n<answer> A </answer>",
        f"<think>{body}</think>\n<answer> A </answer>\n",
        body + "\nAnswer: A",
        "Σ'" * 1_000_000,
    ]
    check_all_modes(responses, ["Hyperdense"] * 4, ["A"] * 4, [OPTIONS] * 4, threads=(1, 2))


# Inputs on which Python's backtracking `re` is quadratic: compared with the reference at a small size,
# then the native parser alone at a size the reference could not finish, where it must stay linear.
PATHOLOGICAL = [
    lambda k: "<answer>" * k,
    lambda k: "<think>" + "</think> \n" * k + "<answer>x</answer>",
    lambda k: "answer: x\n" * k,
    lambda k: "<answer>a\n</answer>" * k,
    lambda k: "<think></think><answer>" + "<answer>\n" * k + "</answer>",
]


@pytest.mark.parametrize("make", PATHOLOGICAL, ids=["unclosed", "think-runs", "tails", "multiline", "nested"])
def test_pathological_inputs_stay_linear(make):
    check_all_modes([make(300)], ["x"], ["A"], [{"A": "x"}])
    small = {mode: rewards.score([make(300)], ["x"], ["A"], mode=mode) for mode in rewards.MODES}
    huge = make(400_000)
    for mode in rewards.MODES:
        start = time.perf_counter()
        result = rewards.score([huge], ["x"], ["A"], mode=mode, threads=1)
        assert time.perf_counter() - start < 2.0, mode
        # These families grade the same at any size; the parsed text scales with it.
        np.testing.assert_array_equal(result.reward, small[mode].reward)
        np.testing.assert_array_equal(result.format_ok, small[mode].format_ok)


def test_many_rows_on_threads():
    responses = [f"<think>{'x' * (i % 700)}</think>\n<answer> {'AB'[i % 2]} </answer>" for i in range(3000)]
    answers, labels = ["Hyperdense"] * 3000, ["A"] * 3000
    want = grading.score(responses, answers, labels, [OPTIONS] * 3000)
    for count in (None, 1, 2, 7):
        assert_same(rewards.score(responses, answers, labels, [OPTIONS] * 3000, threads=count), want)
    assert want.reward.sum() == 3000 // 2


@dataclass
class FakeSample:
    """Duck-typed stand-in for medvl_engine.data.Sample: only the attributes score_samples reads."""

    answer: str
    answer_label: str
    options: dict[str, str]


def test_score_samples_reads_sample_attributes():
    samples = [FakeSample("Hypodense", "B", OPTIONS), FakeSample("Hyperdense", "A", OPTIONS)]
    responses = [f"{T}<answer>B</answer>", f"{T}<answer>hypodense</answer>"]
    result = rewards.score_samples(responses, samples, mode="reward")
    np.testing.assert_array_equal(result.reward, [1.0, 0.0])
    assert result.letter == ["B", "B"]
    with pytest.raises(TypeError, match=r"samples\[0\]"):
        rewards.score_samples(["x"], [object()])


@pytest.mark.parametrize("impl", [rewards, grading], ids=["native", "reference"])
def test_bad_input(impl):
    with pytest.raises(TypeError, match=r"responses\[2\] must be str, got NoneType"):
        impl.score(["a", "b", None], ["x"] * 3, ["A"] * 3)
    with pytest.raises(TypeError, match=r"answers\[1\] must be str, got int"):
        impl.score(["a", "b"], ["x", 3], ["A"] * 2)
    with pytest.raises(TypeError, match=r"answer_labels\[0\] must be str, got bytes"):
        impl.score(["a"], ["x"], [b"A"])
    with pytest.raises(TypeError, match="responses must be a sequence, not a single str"):
        impl.score("abc", ["x"] * 3, ["A"] * 3)
    with pytest.raises(TypeError, match="answers must be a sequence"):
        impl.score(["a"], 5, ["A"])
    with pytest.raises(ValueError, match="answer_labels has 1 items but responses has 2"):
        impl.score(["a", "b"], ["x", "y"], ["A"])
    with pytest.raises(ValueError, match="options has 3 items but responses has 2"):
        impl.score(["a", "b"], ["x", "y"], ["A", "A"], [OPTIONS] * 3)
    with pytest.raises(ValueError, match=r"row 1: answer_label 'E' is not among its options \(A, B, C, D\)"):
        impl.score(["a", "b"], ["x", "y"], ["A", "E"], [OPTIONS] * 2)
    with pytest.raises(TypeError, match=r"options\[0\] must be a mapping"):
        impl.score(["a"], ["x"], ["A"], [["A", "x"]])
    with pytest.raises(TypeError, match=r"options\[0\]\['A'\] must be str, got NoneType"):
        impl.score(["a"], ["x"], ["A"], [{"A": None}])
    with pytest.raises(TypeError, match=r"options\[0\] key must be str, got int"):
        impl.score(["a"], ["x"], ["A"], [{1: "x"}])
    with pytest.raises(ValueError, match="unknown mode 'strict'"):
        impl.score(["a"], ["x"], ["A"], mode="strict")
    with pytest.raises(ValueError, match="threads must be a positive int"):
        impl.score(["a"], ["x"], ["A"], threads=0)


def test_native_entry_point_rejects_what_python_checks():
    with pytest.raises(ValueError, match="unknown mode"):
        native.score(["a"], ["x"], ["A"], None, "Reward", 1)
    with pytest.raises(ValueError, match="threads"):
        native.score(["a"], ["x"], ["A"], None, "reward", -1)


@same_unicode
def test_whitespace_table_is_pythons():
    spaces = {c for c in range(0x110000) if chr(c).isspace()}
    assert set(native.WHITESPACE) == spaces
    assert {m.start() for m in re.finditer(r"\s", EVERY_CODE_POINT)} == spaces
    assert native.strip(EVERY_CODE_POINT) == EVERY_CODE_POINT.strip()


@same_unicode
def test_ignorecase_classes_are_pythons():
    for ch in "answeri: ":
        members = {m.start() for m in re.finditer(re.escape(ch), EVERY_CODE_POINT, re.IGNORECASE)}
        assert set(native.IGNORECASE_CLASSES[ch]) == members, ch


@same_unicode
def test_lower_table_is_pythons():
    assert native.lower(EVERY_CODE_POINT) == EVERY_CODE_POINT.lower()
    # Final_Sigma context: each code point before, between and after cased letters and a capital sigma.
    for probe in ("{}\u03a3", "A{}\u03a3", "A\u03a3{}", "A\u03a3{}a"):
        text = " ".join(probe.format(chr(c)) for c in range(0x110000))
        assert native.lower(text) == text.lower(), probe
