"""Per-benchmark accuracy in MedVLThinker's table layout: PMC, MMMU, MedX-M, PathVQA, SLAKE, VQA-Rad, Avg.

    table = accuracy_table([{"dataset_name": "pmc_vqa", "correct": True}, ...])
    print(table.to_markdown())          # | | PMC | ... | Avg. |
    json.dumps(table.to_dict())

A record is one question: its `dataset_name` and `correct`, a bool or the fraction of its rollouts that
were correct (MedVLThinker's `average_num_correct`). A dataset's accuracy is the mean over its
questions; Avg. is the unweighted mean over the six benchmarks present, as in MedVLThinker's README
(49.14 = 294.85 / 6 for the 3B base model). Other datasets get their own columns after the six and
count towards Avg. only when none of the six is present.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# (dataset_name in MedVLThinker-Eval, column header in its tables), in table order.
BENCHMARKS: tuple[tuple[str, str], ...] = (
    ("pmc_vqa", "PMC"),
    ("MMMU-medical", "MMMU"),
    ("MedXpertQA-MM", "MedX-M"),
    ("pathvqa_closed", "PathVQA"),
    ("slake_closed", "SLAKE"),
    ("vqa_rad_closed", "VQA-Rad"),
)
COLUMN_OF = dict(BENCHMARKS)
AVERAGE_COLUMN = "Avg."


@dataclass(frozen=True)
class DatasetAccuracy:
    """One column: how many questions a dataset had and the sum of their correctness (0..count)."""

    dataset_name: str
    column: str
    count: int
    correct: float

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"{self.dataset_name}: count must be >= 1, got {self.count}")
        if not 0.0 <= self.correct <= self.count:
            raise ValueError(f"{self.dataset_name}: correct {self.correct} outside 0..{self.count}")

    @property
    def accuracy(self) -> float:
        """Fraction in [0, 1]."""
        return self.correct / self.count


@dataclass(frozen=True)
class AccuracyTable:
    """Columns in MedVLThinker's order (the six benchmarks present, then other datasets by name) and Avg.

    `average` is a fraction in [0, 1] (None for an empty table); `averaged` names the datasets in it.
    """

    columns: tuple[DatasetAccuracy, ...]
    average: float | None
    averaged: tuple[str, ...]

    def __post_init__(self) -> None:
        names = [c.dataset_name for c in self.columns]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names repeat across columns: {names}")
        unknown = set(self.averaged) - set(names)
        if unknown:
            raise ValueError(f"averaged datasets {sorted(unknown)} have no column")

    def __getitem__(self, dataset_name: str) -> DatasetAccuracy:
        for column in self.columns:
            if column.dataset_name == dataset_name:
                return column
        raise KeyError(dataset_name)

    @property
    def questions(self) -> int:
        return sum(c.count for c in self.columns)

    def to_markdown(self, row_label: str = "accuracy (%)") -> str:
        """A markdown table: one header row of columns, one row of accuracies in percent (2 decimals,
        as MedVLThinker reports them) and one row of question counts."""
        return comparison_markdown({row_label: self}, counts=True)

    def to_dict(self) -> dict:
        return {
            "columns": [c.column for c in self.columns] + [AVERAGE_COLUMN],
            "datasets": {
                c.dataset_name: {"column": c.column, "count": c.count, "correct": c.correct, "accuracy": c.accuracy}
                for c in self.columns
            },
            "average": self.average,
            "averaged": list(self.averaged),
            "questions": self.questions,
        }


def accuracy_table(records: Iterable) -> AccuracyTable:
    """Build the table from per-question records: mappings with "dataset_name" and "correct", or
    (dataset_name, correct) pairs; `correct` is a bool or a fraction in [0, 1]."""
    counts: dict[str, int] = {}
    sums: dict[str, float] = {}
    for i, record in enumerate(records):
        name, correct = _unpack(record, i)
        counts[name] = counts.get(name, 0) + 1
        sums[name] = sums.get(name, 0.0) + correct
    known = [name for name, _ in BENCHMARKS if name in counts]
    extra = sorted(name for name in counts if name not in COLUMN_OF)
    columns = tuple(DatasetAccuracy(n, COLUMN_OF.get(n, n), counts[n], sums[n]) for n in known + extra)
    averaged = tuple(known or extra)
    average = sum(sums[n] / counts[n] for n in averaged) / len(averaged) if averaged else None
    return AccuracyTable(columns=columns, average=average, averaged=averaged)


def comparison_markdown(tables: Mapping[str, AccuracyTable], *, counts: bool = False) -> str:
    """Several runs side by side, one row each (percent, 2 decimals), over the union of their columns
    in table order; "-" where a run lacks a dataset. With `counts`, a last row gives question counts
    (taken from the first run that has each dataset)."""
    by_name: dict[str, DatasetAccuracy] = {}
    for table in tables.values():
        for column in table.columns:
            by_name.setdefault(column.dataset_name, column)
    known = [name for name, _ in BENCHMARKS if name in by_name]
    names = known + sorted(n for n in by_name if n not in COLUMN_OF)
    header = [""] + [by_name[n].column for n in names] + [AVERAGE_COLUMN]
    rows = []
    for label, table in tables.items():
        present = {c.dataset_name: c for c in table.columns}
        cells = [_percent(present[n].accuracy) if n in present else "-" for n in names]
        rows.append([label] + cells + [_percent(table.average) if table.average is not None else "-"])
    if counts:
        total = sum(by_name[n].count for n in names)
        rows.append(["questions"] + [str(by_name[n].count) for n in names] + [str(total)])
    return _markdown(header, rows)


def _unpack(record, i: int) -> tuple[str, float]:
    if isinstance(record, Mapping):
        if "dataset_name" not in record or "correct" not in record:
            raise ValueError(f"records[{i}]: needs 'dataset_name' and 'correct', has {sorted(record)}")
        name, correct = record["dataset_name"], record["correct"]
    elif isinstance(record, Sequence) and not isinstance(record, str) and len(record) == 2:
        name, correct = record
    else:
        raise TypeError(f"records[{i}]: expected a mapping or a (dataset_name, correct) pair, got {record!r}")
    if not isinstance(name, str):
        raise TypeError(f"records[{i}]: dataset_name must be str, got {type(name).__name__}")
    try:
        if isinstance(correct, (str, bytes)):
            raise TypeError
        value = float(correct)
    except (TypeError, ValueError):
        raise TypeError(f"records[{i}]: correct must be a bool or a number, got {correct!r}") from None
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"records[{i}]: correct must lie in [0, 1], got {correct!r}")
    return name, value


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
