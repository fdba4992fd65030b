"""majority@n as MedVLThinker's regrader computes it (analysis/regrade_eval_results.py): each extracted
answer is mapped to the first option letter it grades equal to, else kept as the raw string, and the
vote is `Counter(...).most_common(1)[0][0]` compared with answer_label."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from medvl_engine import grading
from medvl_engine.evals.metrics import majority_vote, score_run
from medvl_engine.rewards import score


def _response(answer: str) -> str:
    return f"<think>reasoning</think>\n<answer>{answer}</answer>"


def _record(name: str, answers: list[str], options: dict[str, str], label: str, *, texts=None) -> dict:
    texts = texts or [_response(a) for a in answers]
    return {
        "dataset_name": name, "dataset_index": 0, "answer_label": label, "answer": options[label],
        "options": options, "prompts": "", "num_rollouts": len(texts), "num_correct": 0,
        "parsed_outputs": [{"output_text": t, "pred_letter": "", "is_correct": False} for t in texts],
    }


def _medvlthinker_majority_correct(preds: list[str], options: dict[str, str], answer_label: str) -> bool:
    """MedVLThinker's rule written out plainly: grade_answer against every option, first hit's letter
    or the raw prediction, then a Counter vote (ties: the first seen)."""

    def grade(prediction: str, answer: str, label: str) -> bool:
        p = prediction.strip().lower()
        return p in (f"{label}. {answer}".strip().lower(), label.strip().lower(), answer.strip().lower())

    votes = []
    for pred in preds:
        hits = [label for label, text in options.items() if grade(pred, text, label)]
        votes.append(hits[0] if hits else pred)
    return Counter(votes).most_common(1)[0][0] == answer_label


def _lowercase_rule_correct(preds: list[str], options: dict[str, str], answer_label: str) -> bool:
    """The rule this package used before: unmapped answers merged by strip().lower()."""
    votes = []
    for pred in preds:
        hits = [label for label, text in options.items() if grading.grade_answer(pred, text, label)]
        votes.append(hits[0].upper() if hits else pred.strip().lower())
    return Counter(votes).most_common(1)[0][0] == answer_label.strip().upper()


def test_issue_example():
    # Votes after mapping: Σ, FOO, B, σ, B, A ("yes" is option A's text): B wins with two.
    # Lower-casing the unmapped answers would merge Σ and σ into a first-seen two-vote tie that σ wins.
    preds = ["Σ", "FOO", "B", "σ", "B", "yes"]
    options = {"A": "Yes", "B": "No"}
    scores = score_run([_record("VQA-RAD", preds, options, "B")], "regrade")
    assert scores.majority_at_n["VQA-RAD"].accuracy == 1.0
    assert scores.accuracy["VQA-RAD"].accuracy == pytest.approx(2 / 6)
    assert _medvlthinker_majority_correct(preds, options, "B")
    assert not _lowercase_rule_correct(preds, options, "B")
    scored = score([_response(p) for p in preds], ["No"] * 6, ["B"] * 6, [options] * 6, mode="regrade")
    assert scored.letter == ["", "", "B", "", "B", "A"]
    assert majority_vote(scored.letter, scored.parsed) == "B"


def test_ties_go_to_the_answer_seen_first():
    options = {"A": "Yes", "B": "No"}
    assert majority_vote(["B", "A"], ["No", "Yes"]) == "B"
    assert majority_vote(["A", "B"], ["Yes", "No"]) == "A"
    assert majority_vote(["", "B"], ["maybe", "b"]) == "maybe"
    assert majority_vote(["", "", "B", "B"], ["FOO", "foo", "B", "no"]) == "B"  # FOO and foo are two answers
    for preds, right in ((["No", "Yes"], 1.0), (["Yes", "No"], 0.0)):
        scores = score_run([_record("SLAKE", preds, options, "B")], "regrade")
        assert scores.majority_at_n["SLAKE"].accuracy == right


def test_answer_label_is_compared_exactly():
    # MedVLThinker compares the winning vote with answer_label as it is: no strip, no case folding.
    assert majority_vote(["", ""], ["b", "b"]) == "b"
    options = {"A": "Yes", "B": "No"}
    scores = score_run([_record("SLAKE", ["B", "b", "No"], options, "B")], "regrade")
    assert scores.majority_at_n["SLAKE"].accuracy == 1.0  # all three map to the letter B


def test_reward_mode_unformatted_answers_vote_for_no_answer():
    # Two bare "B" fail the format gate: they carry no letter and pool into one "no answer" vote that
    # beats the single formatted "B"; with their raw text they would have voted for the label "B".
    options = {"A": "Yes", "B": "No"}
    texts = ["B", "B", _response("B")]
    scores = score_run([_record("SLAKE", [], options, "B", texts=texts)], "reward")
    assert scores.majority_at_n["SLAKE"].accuracy == 0.0
    assert scores.no_parse["SLAKE"].accuracy == pytest.approx(2 / 3)
    assert majority_vote([None, None, "B"], ["B", "B", "B"]) is None
    assert score_run([_record("SLAKE", [], options, "B", texts=texts)], "regrade").majority_at_n["SLAKE"].accuracy == 1


def test_bad_votes():
    with pytest.raises(ValueError, match="at least one answer"):
        majority_vote([], [])
    with pytest.raises(ValueError, match="one letter per parsed answer"):
        majority_vote(["A"], ["A", "B"])


# Option texts and free answers chosen so raw strings and case-folded strings group differently:
# case variants, Greek sigma forms, the dotted capital I (lower() gives two code points), titlecase digraphs.
TEXTS = ["Yes", "No", "Normal", "Left lung", "Σ", "İstanbul", "ǅ"]
FREE = ["FOO", "foo", "Foo", "σ", "Σ", "ς", "ß", "SS", "ǆ", "Ǆ", "maybe", "Maybe", "i̇stanbul", "normal."]


def _random_question(rng: random.Random) -> tuple[dict[str, str], str, list[str]]:
    k = rng.randint(2, 5)
    options = {chr(ord("A") + i): text for i, text in enumerate(rng.sample(TEXTS, k))}
    label = rng.choice(list(options))
    pool = []
    for letter, text in options.items():
        pool += [letter, letter.lower(), text, text.lower(), text.upper(), f"{letter}. {text}"]
    pool = rng.sample(pool, 4) + rng.sample(FREE, 4)  # a small pool: votes collide and tie often
    return options, label, pool


@pytest.mark.parametrize("n", [2, 5, 8])
def test_random_questions_match_medvlthinker(n):
    rng = random.Random(n)
    records, expected, preds_of = [], {}, {}
    questions = 1500
    for q in range(questions):
        options, label, pool = _random_question(rng)
        preds = [rng.choice(pool) for _ in range(n)]
        name = f"q{q:04d}"
        records.append(_record(name, preds, options, label))
        expected[name] = _medvlthinker_majority_correct(preds, options, label)
        preds_of[name] = (preds, options, label)
    # The regrader extracts each answer unchanged from these responses.
    for record, (preds, _, _) in zip(records, preds_of.values()):
        assert [grading.EXTRACT["regrade"](o["output_text"]) for o in record["parsed_outputs"]] == preds
    table = score_run(records, "regrade").majority_at_n
    got = {column.dataset_name: column.accuracy for column in table.columns}
    assert got == {name: float(ok) for name, ok in expected.items()}
    # The generator reaches questions where lower-casing unmapped answers changes the verdict (with two
    # answers both rules pick the first one, so only n > 2 can differ).
    differ = sum(_lowercase_rule_correct(*preds_of[name]) != ok for name, ok in expected.items())
    assert differ > 0 or n == 2
