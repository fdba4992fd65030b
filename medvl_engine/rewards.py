"""Batched answer scoring: MedVLThinker's grading rules over a whole batch in one native call.

`score(...)` hands the batch to the C++ extension (`medvl_engine._native`), which copies the strings
out of the Python objects, releases the GIL, parses and grades the rows on a pool of threads, and
builds numpy outputs. `medvl_engine.grading` holds the pure-Python reference with the same signature,
written on Python's `re` exactly as MedVLThinker's scripts are; the tests hold the two equal.

Modes (MedVLThinker's three scripts):

- ``reward``  (RL reward, train/my_reward.py): format gate = the whole response fully matches
  ``<think>.*?</think>\\s*<answer>.*?</answer>`` (DOTALL); prediction = the first single-line
  ``<answer>(.*?)</answer>`` stripped, else the whole response stripped. Reward 1.0 only when the gate
  passes and the prediction is correct.
- ``eval``    (offline evaluation): prediction = the first ``<answer>(.*?)</answer>`` (DOTALL) of the
  stripped response, stripped, else the whole stripped response.
- ``regrade`` (the regrader behind the published tables): the first line of the last
  ``<answer>...</answer>`` block, else the rest of the line after the last ``answer:``, ``answer is:``,
  ``answer is`` or ``is:`` (case-insensitive), else the whole text; then the literal tags removed.

A prediction is correct when ``pred.strip().lower()`` equals the label, the option text or
``f"{label}. {text}"`` (each stripped and lowered), with Python's Unicode meaning of strip and lower.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medvl_engine._build import load_native
from medvl_engine.errors import ConfigError

MODES = ("reward", "eval", "regrade")


@dataclass(frozen=True)
class ScoreResult:
    """Per-row results of one `score` call, each of the batch's length.

    reward:    float32; in ``reward`` mode 1.0 when `format_ok` and `correct`, else `correct` as 0/1.
    correct:   bool; the prediction matches the row's label/answer (whatever the format).
    format_ok: bool; the raw response passes the reward-mode format gate (reported in every mode).
    parsed:    the prediction after the mode's extraction (not lowered).
    letter:    the option letter the prediction maps to: with options, the first option (in the
               mapping's order) whose three-way comparison hits; without options, the row's
               answer_label when correct; "" when none.
    """

    reward: np.ndarray
    correct: np.ndarray
    format_ok: np.ndarray
    parsed: list[str]
    letter: list[str]

    def __post_init__(self) -> None:
        n = len(self.parsed)
        for name, dtype in (("reward", np.float32), ("correct", np.bool_), ("format_ok", np.bool_)):
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != dtype or array.shape != (n,):
                raise ValueError(f"ScoreResult.{name} must be a {np.dtype(dtype).name} array of shape ({n},)")
        if len(self.letter) != n:
            raise ValueError(f"ScoreResult.letter has {len(self.letter)} items, parsed has {n}")

    def __len__(self) -> int:
        return len(self.parsed)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)}")


def check_threads(threads: int | None) -> int:
    """None -> 0 (the native side then uses every core); otherwise a positive int."""
    if threads is None:
        return 0
    count = operator.index(threads)
    if count < 1:
        raise ValueError(f"threads must be a positive int or None, got {threads!r}")
    return count


def score(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_labels: Sequence[str],
    options: Sequence[Mapping[str, str] | None] | None = None,
    *,
    mode: str = "reward",
    threads: int | None = None,
) -> ScoreResult:
    """Score a batch of model responses against their answers in one native call.

    responses, answers (option texts) and answer_labels (letters) are equal-length sequences of str.
    options, when given, is an equal-length sequence of letter -> text mappings (a row may be None:
    no letter mapping for it); each row's answer_label must be one of its letters. mode is one of
    MODES; threads=None uses every core, threads=1 scores on the calling thread.

    Raises TypeError naming the argument and index for a non-str where a str is expected, and
    ValueError for mismatched lengths, an unknown mode, or an answer_label missing from its options.
    """
    check_mode(mode)
    count = check_threads(threads)
    native = load_native()
    reward, correct, format_ok, parsed, letter = native.score(responses, answers, answer_labels, options, mode, count)
    return ScoreResult(reward=reward, correct=correct, format_ok=format_ok, parsed=parsed, letter=letter)


def sample_columns(samples: Sequence) -> tuple[list[str], list[str], list]:
    """(answers, answer_labels, options) read from objects with those attributes (e.g. data.Sample)."""
    answers, labels, options = [], [], []
    for i, sample in enumerate(samples):
        try:
            answers.append(sample.answer)
            labels.append(sample.answer_label)
            options.append(sample.options)
        except AttributeError as exc:
            raise TypeError(f"samples[{i}] lacks answer/answer_label/options: {exc}") from None
    return answers, labels, options


def score_samples(
    responses: Sequence[str], samples: Sequence, *, mode: str = "reward", threads: int | None = None
) -> ScoreResult:
    """`score` with answers, labels and options read from samples (objects with `answer`,
    `answer_label` and `options` attributes, such as `medvl_engine.data.Sample`), row by row."""
    answers, labels, options = sample_columns(samples)
    return score(responses, answers, labels, options, mode=mode, threads=threads)
