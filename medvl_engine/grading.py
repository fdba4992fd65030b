"""Pure-Python reference of the answer grading: MedVLThinker's rules on Python's `re`, row by row.

This is the oracle for `medvl_engine.rewards` (the native parser): the same `score(...)` signature and
result type, written the way MedVLThinker's own scripts are (train/my_reward.py for ``reward``,
eval/run_offline_inference.py for ``eval``, analysis/regrade_eval_results.py for ``regrade``), so a
disagreement between the two is a bug in the native code. Slow by design; benchmarks compare to it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np

from medvl_engine.errors import DataError
from medvl_engine.rewards import ScoreResult, check_mode, check_threads

FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
ANSWER_LINE = re.compile(r"<answer>(.*?)</answer>")
ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FIRST_LINE = re.compile(r"\s*([^\n\r]+)")
# The regrader's fallbacks, tried in this order; the last match of the first pattern that matches wins.
TAILS = tuple(
    re.compile(pattern, re.IGNORECASE)
    for pattern in (r"answer:\s*(.*)\s*", r"answer is:\s*(.*)\s*", r"answer is\s*(.*)\s*", r"is:\s*(.*)\s*")
)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def format_ok(response: str) -> bool:
    """The reward's format gate on the raw (unstripped) response."""
    return FORMAT.fullmatch(response) is not None


def extract_reward(response: str) -> str:
    match = ANSWER_LINE.search(response)
    return match.group(1).strip() if match else response.strip()


def extract_eval(response: str) -> str:
    text = response.strip()
    match = ANSWER_BLOCK.search(text)
    return match.group(1).strip() if match else text


def _regrade_raw(text: str) -> str:
    blocks = list(ANSWER_BLOCK.finditer(text))
    if blocks:
        body = blocks[-1].group(1).strip()
        first_line = FIRST_LINE.search(body)
        return first_line.group(1).strip() if first_line else body
    for pattern in TAILS:
        matches = list(pattern.finditer(text))
        if matches:
            return matches[-1].group(1).strip()
    return text.strip()


def extract_regrade(response: str) -> str:
    text = _regrade_raw(response)
    for tag in TAGS:
        text = text.replace(tag, "")
    return text.strip()


EXTRACT = {"reward": extract_reward, "eval": extract_eval, "regrade": extract_regrade}


def grade_answer(prediction: str, answer: str, answer_label: str) -> bool:
    """MedVLThinker's three-way, case-insensitive exact comparison."""
    pred = prediction.strip().lower()
    return (
        pred == f"{answer_label}. {answer}".strip().lower()
        or pred == answer_label.strip().lower()
        or pred == answer.strip().lower()
    )


def _checked_str(value, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where} must be str, got {type(value).__name__}")
    return value


def _checked_column(values, name: str) -> list:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a sequence, not a single {type(values).__name__}")
    try:
        return list(values)
    except TypeError:
        raise TypeError(f"{name} must be a sequence, got {type(values).__name__}") from None


def _checked_options(row_options, label: str, row: int) -> list[tuple[str, str]] | None:
    if row_options is None:
        return None
    if not isinstance(row_options, Mapping):
        raise TypeError(f"options[{row}] must be a mapping of letter -> text or None, got {type(row_options).__name__}")
    items = []
    for letter, text in row_options.items():
        items.append((_checked_str(letter, f"options[{row}] key"), _checked_str(text, f"options[{row}][{letter!r}]")))
    if not any(letter == label for letter, _ in items):
        letters = ", ".join(letter for letter, _ in items)
        raise DataError(f"row {row}: answer_label {label!r} is not among its options ({letters})")
    return items


def score(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_labels: Sequence[str],
    options: Sequence[Mapping[str, str] | None] | None = None,
    *,
    mode: str = "reward",
    threads: int | None = None,
) -> ScoreResult:
    """Reference twin of `medvl_engine.rewards.score` (threads is checked and ignored)."""
    check_mode(mode)
    check_threads(threads)
    columns = {"responses": responses, "answers": answers, "answer_labels": answer_labels}
    if options is not None:
        columns["options"] = options
    rows = {name: _checked_column(values, name) for name, values in columns.items()}
    n = len(rows["responses"])
    for name, values in rows.items():
        if len(values) != n:
            raise ValueError(f"{name} has {len(values)} items but responses has {n}")
    extract = EXTRACT[mode]
    reward = np.zeros(n, dtype=np.float32)
    correct = np.zeros(n, dtype=np.bool_)
    well_formed = np.zeros(n, dtype=np.bool_)
    parsed: list[str] = []
    letters: list[str] = []
    for i in range(n):
        response = _checked_str(rows["responses"][i], f"responses[{i}]")
        answer = _checked_str(rows["answers"][i], f"answers[{i}]")
        label = _checked_str(rows["answer_labels"][i], f"answer_labels[{i}]")
        items = _checked_options(rows["options"][i], label, i) if "options" in rows else None
        prediction = extract(response)
        hit = grade_answer(prediction, answer, label)
        ok = format_ok(response)
        if items is None:
            letter = label if hit else ""
        else:
            letter = next((key for key, text in items if grade_answer(prediction, text, key)), "")
        correct[i] = hit
        well_formed[i] = ok
        reward[i] = 1.0 if hit and (ok or mode != "reward") else 0.0
        parsed.append(prediction)
        letters.append(letter)
    return ScoreResult(reward=reward, correct=correct, format_ok=well_formed, parsed=parsed, letter=letters)
