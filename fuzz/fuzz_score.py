"""Differential fuzzer of the native parser: `_native.score` must equal the `re`-based reference or raise
the same error, on any batch the fuzzer builds, and never crash the process.

Needs atheris (`pip install atheris`); not part of the test suite. Run for a few minutes:

    python fuzz/fuzz_score.py -max_total_time=300 -max_len=2048 [corpus_dir]

Batches are built from the fuzzer's bytes: responses mixing tag fragments, tail phrases ("answer is:"),
whitespace and case-folding oddities, lone surrogates and raw code points; options with letters that may
or may not contain the label; now and then a non-str value. A mismatch raises with the batch printed.
"""

from __future__ import annotations

import sys

import atheris
import numpy as np

from medvl_engine import grading
from medvl_engine._build import load_native

native = load_native()
MODES = ("reward", "eval", "regrade")
FRAGMENTS = [
    "<think>", "</think>", "<answer>", "</answer>", "<answer", "</", "<", ">", "\n", "\r", " ", "\t", "\u00a0",
    "\u3000", "\x85", "\u2028", "\x1c", "A", "b", "C. ", "Answer:", "answer is", "ANSWER IS: ", "is:", "anſwer:",
    "İs:", "ıs: ", "Σ", "ΑΣ", "ς", "'", "\u0345", "İ", "ß", "\ud800", "\udfff", "\U0001fac0", "Ménière", "ΟΔΟΣ",
    "hyperdense", "B. Hyperdense",
]
LETTERS = ["A", "B", "C", "D", "a", " B", "Σ", "İ"]


def text(fdp: atheris.FuzzedDataProvider, pieces: int) -> str:
    parts = []
    for _ in range(fdp.ConsumeIntInRange(0, pieces)):
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            parts.append(fdp.ConsumeUnicode(4))  # may hold lone surrogates
        else:
            parts.append(fdp.PickValueInList(FRAGMENTS))
    return "".join(parts)


def maybe_bad(fdp: atheris.FuzzedDataProvider, value):
    return fdp.PickValueInList([None, 7, b"A"]) if fdp.ConsumeIntInRange(0, 60) == 0 else value


def outcome(score, *args, **kwargs):
    try:
        return score(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        return type(exc)


def TestOneInput(data: bytes) -> None:  # noqa: N802 (atheris' entry point name)
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.PickValueInList(list(MODES))
    responses, answers, labels, options = [], [], [], []
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        letters = list(dict.fromkeys(fdp.PickValueInList(LETTERS) for _ in range(fdp.ConsumeIntInRange(1, 4))))
        row_options = {letter: text(fdp, 3) for letter in letters}
        label = fdp.PickValueInList(letters) if fdp.ConsumeIntInRange(0, 20) else "E"
        responses.append(maybe_bad(fdp, text(fdp, 16)))
        answers.append(maybe_bad(fdp, row_options.get(label, "") if fdp.ConsumeBool() else text(fdp, 2)))
        labels.append(maybe_bad(fdp, label))
        options.append(row_options if fdp.ConsumeIntInRange(0, 3) else None)
    with_options = options if fdp.ConsumeBool() else None
    threads = fdp.ConsumeIntInRange(1, 3)

    want = outcome(grading.score, responses, answers, labels, with_options, mode=mode)
    got = outcome(native.score, responses, answers, labels, with_options, mode, threads)
    if isinstance(want, type) or isinstance(got, type):
        if want is not got:
            raise AssertionError(f"error mismatch {want} != {got} on {responses!r} {answers!r} {labels!r} {options!r}")
        return
    reward, correct, format_ok, parsed, letter = got
    same = (
        parsed == want.parsed
        and letter == want.letter
        and np.array_equal(reward, want.reward)
        and np.array_equal(correct, want.correct)
        and np.array_equal(format_ok, want.format_ok)
    )
    if not same:
        raise AssertionError(
            f"mode {mode}: native {parsed!r} {letter!r} {reward} vs reference {want.parsed!r} {want.letter!r} "
            f"{want.reward} on {responses!r} {answers!r} {labels!r} {with_options!r}"
        )


def main() -> None:
    # The editable install's import hook hides modules from instrument_imports(); instrument the
    # reference's functions directly so its branches guide the fuzzer.
    for name in ("format_ok", "extract_reward", "extract_eval", "extract_regrade", "_regrade_raw", "grade_answer"):
        atheris.instrument_func(getattr(grading, name))
    atheris.Setup(sys.argv, atheris.instrument_func(TestOneInput))
    atheris.Fuzz()


if __name__ == "__main__":
    main()
