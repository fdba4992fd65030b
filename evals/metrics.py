"""Accuracy of a run from its results file, in each of the three parser modes, and over repeats.

Every number is recomputed from the `output_text` of the records (the `is_correct` flags stored in
the file are one mode's), with one batched call into `medvl_engine.rewards.score` per mode, and put
into `medvl_engine.tables` accuracy tables (MedVLThinker's columns; Avg. = unweighted mean of the six
benchmarks present):

- accuracy: a question counts num_correct / num_rollouts (MedVLThinker's `average_num_correct`);
  with n=1 it is plain accuracy;
- pass@n: a question counts 1 when any of its n answers is correct (n > 1 only);
- majority@n: a question counts 1 when its most frequent answer is its answer_label (n > 1 only),
  by MedVLThinker's rule (`majority_vote`); in reward mode an answer failing the format gate votes
  for "no answer";
- no-parse: a question counts the fraction of its answers that map to no option letter (in reward
  mode also every answer failing the format gate).

Over repeats: per column the mean and the sample standard deviation (ddof=1, as pandas computes it
in MedVLThinker's table notebook); Avg. likewise over each repeat's Avg.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.tables import AccuracyTable, DatasetAccuracy, accuracy_table

MODES = ("regrade", "eval", "reward")
METRICS = ("accuracy", "pass_at_n", "majority_at_n", "no_parse")


@dataclass(frozen=True)
class RunScores:
    """One run in one parser mode: a table per metric (pass@n and majority@n only when n > 1)."""

    mode: str
    num_rollouts: int
    accuracy: AccuracyTable
    pass_at_n: AccuracyTable | None
    majority_at_n: AccuracyTable | None
    no_parse: AccuracyTable

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown parser mode {self.mode!r} (choose from {', '.join(MODES)})")
        if (self.pass_at_n is None) != (self.num_rollouts == 1):
            raise ValueError("pass@n and majority@n exist exactly when num_rollouts > 1")


def majority_vote(letters: Sequence[str | None], parsed: Sequence[str]) -> str | None:
    """The majority answer of one question's rollouts, as MedVLThinker's regrader computes it.

    analysis/regrade_eval_results.py maps each extracted answer to the first option letter it grades
    equal to, keeps the extracted string itself when it maps to none, and takes
    `collections.Counter(votes).most_common(1)[0][0]`: votes are compared as raw strings (no strip,
    no case folding, so "Σ" and "σ" are two answers) and a tie goes to the answer seen first.
    `letters[i]` is answer i's letter ("" when it maps to no option; None when it must not vote for
    any letter or text, then all such answers pool into one "no answer" vote), `parsed[i]` its
    extracted string. The question counts as right when the result equals its answer_label exactly.
    """
    if len(letters) != len(parsed) or not letters:
        raise ValueError(f"majority_vote needs one letter per parsed answer and at least one answer, got "
                         f"{len(letters)} letters and {len(parsed)} answers")
    votes = [text if letter == "" else letter for letter, text in zip(letters, parsed)]
    return Counter(votes).most_common(1)[0][0]


def score_run(records: list[dict], mode: str, *, threads: int | None = None) -> RunScores:
    """Score one run's records in one parser mode (`regrade`, `eval` or `reward`)."""
    from medvl_engine.rewards import score

    if mode not in MODES:
        raise ConfigError(f"unknown parser mode {mode!r} (choose from {', '.join(MODES)})")
    if not records:
        raise ValueError("no records to score")
    sizes = {r["num_rollouts"] for r in records}
    if len(sizes) != 1:
        raise RunFolderError(f"records mix numbers of rollouts {sorted(sizes)}; pass@n and majority@n need one n")
    n = sizes.pop()
    responses, answers, labels, options = [], [], [], []
    for record in records:
        if "options" not in record:
            raise RunFolderError(f"dataset_index {record['dataset_index']}: record has no 'options'; it cannot be "
                                 "rescored")
        for output in record["parsed_outputs"]:
            responses.append(output["output_text"])
            answers.append(record["answer"])
            labels.append(record["answer_label"])
            options.append(record["options"])
    scored = score(responses, answers, labels, options, mode=mode, threads=threads)
    # In reward mode an answer counts only when it also passes the format gate (`correct` alone
    # ignores the format), and an answer failing the gate yields no answer (letter None): it cannot
    # vote for the right letter with its unformatted text.
    if mode == "reward":
        correct = scored.reward > 0
        letters = [letter if ok else None for letter, ok in zip(scored.letter, scored.format_ok)]
    else:
        correct = np.asarray(scored.correct, dtype=bool)
        letters = list(scored.letter)

    rows: dict[str, list] = {metric: [] for metric in METRICS}
    for q, record in enumerate(records):
        span = slice(q * n, (q + 1) * n)
        hits = int(correct[span].sum())
        winner = majority_vote(letters[span], scored.parsed[span])
        name = record["dataset_name"]
        rows["accuracy"].append((name, hits / n))
        rows["pass_at_n"].append((name, hits > 0))
        rows["majority_at_n"].append((name, winner == record["answer_label"]))
        rows["no_parse"].append((name, sum(1 for letter in letters[span] if not letter) / n))
    multi = n > 1
    return RunScores(
        mode=mode,
        num_rollouts=n,
        accuracy=accuracy_table(rows["accuracy"]),
        pass_at_n=accuracy_table(rows["pass_at_n"]) if multi else None,
        majority_at_n=accuracy_table(rows["majority_at_n"]) if multi else None,
        no_parse=accuracy_table(rows["no_parse"]),
    )


def _combine(tables: list[AccuracyTable], reduce) -> AccuracyTable:
    """A table whose every column (and Avg.) is `reduce` over the same column of `tables`."""
    first = tables[0]
    for k, table in enumerate(tables[1:], 1):
        if [c.dataset_name for c in table.columns] != [c.dataset_name for c in first.columns]:
            raise RunFolderError(f"repeat {k} covers {[c.dataset_name for c in table.columns]}, repeat 0 covers "
                                 f"{[c.dataset_name for c in first.columns]}")
    columns = tuple(
        DatasetAccuracy(c.dataset_name, c.column, c.count,
                        c.count * reduce([t[c.dataset_name].accuracy for t in tables]))
        for c in first.columns
    )
    return AccuracyTable(columns=columns, average=reduce([t.average for t in tables]), averaged=first.averaged)


def mean_table(tables: list[AccuracyTable]) -> AccuracyTable:
    return _combine(tables, statistics.fmean)


def std_table(tables: list[AccuracyTable]) -> AccuracyTable | None:
    """Sample standard deviation (ddof=1) per column; None for a single run."""
    return _combine(tables, statistics.stdev) if len(tables) > 1 else None


def _percent_row(table: AccuracyTable | None) -> dict | None:
    if table is None:
        return None
    row = {c.dataset_name: 100.0 * c.accuracy for c in table.columns}
    row["Avg."] = None if table.average is None else 100.0 * table.average
    return row


@dataclass(frozen=True)
class Summary:
    """All repeats of one run folder, scored in every mode: the per-repeat scores and their mean/std."""

    repeats: list[dict[str, RunScores]]  # one {mode: RunScores} per repeat

    def __post_init__(self):
        if not self.repeats:
            raise ValueError("a summary needs at least one repeat")

    @property
    def modes(self) -> list[str]:
        return list(self.repeats[0])

    @property
    def num_rollouts(self) -> int:
        return next(iter(self.repeats[0].values())).num_rollouts

    def tables(self, mode: str, metric: str) -> list[AccuracyTable] | None:
        tables = [getattr(repeat[mode], metric) for repeat in self.repeats]
        return None if tables[0] is None else tables

    def mean(self, mode: str, metric: str = "accuracy") -> AccuracyTable | None:
        tables = self.tables(mode, metric)
        return None if tables is None else mean_table(tables)

    def std(self, mode: str, metric: str = "accuracy") -> AccuracyTable | None:
        tables = self.tables(mode, metric)
        return None if tables is None else std_table(tables)

    def to_dict(self) -> dict:
        """Percentages: `{mode: {metric: {"runs": [...], "mean": {...}, "std": {...}}}}` plus counts."""
        first = self.repeats[0][self.modes[0]].accuracy
        out = {"repeats": len(self.repeats), "num_rollouts": self.num_rollouts,
               "questions": {c.dataset_name: c.count for c in first.columns},
               "columns": {c.dataset_name: c.column for c in first.columns},
               "averaged": list(first.averaged), "modes": {}}
        for mode in self.modes:
            out["modes"][mode] = {}
            for metric in METRICS:
                tables = self.tables(mode, metric)
                if tables is None:
                    continue
                out["modes"][mode][metric] = {
                    "runs": [_percent_row(t) for t in tables],
                    "mean": _percent_row(mean_table(tables)),
                    "std": _percent_row(std_table(tables)),
                }
        return out


def summarize(repeats: list[list[dict]], *, modes: tuple[str, ...] = MODES) -> Summary:
    """Score the records of each repeat in every mode."""
    return Summary([{mode: score_run(records, mode) for mode in modes} for records in repeats])
