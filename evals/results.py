"""The results file of a run: one jsonl line per finished question, appended as questions finish.

The layout is MedVLThinker's `eval_results.jsonl` (`dataset_name`, `dataset_index`, `answer_label`,
`answer`, `prompts`, `parsed_outputs` with `output_text`, `pred_letter`, `is_correct` per sample,
`num_rollouts`, `num_correct`), plus `options` so that a file can be rescored on its own.

A crashed or stopped run is resumed from this file: `ResultsFile.open()` returns the
`dataset_index` values already written and cuts off a line torn by the crash, `append()` refuses an
index that is already there (nothing is written twice), and `finalize()` rewrites the complete file
sorted by `dataset_index`, so an interrupted and resumed run ends with the same bytes as an
uninterrupted one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import msgspec

from medvl_engine.errors import RunFolderError
from medvl_engine.files import write_atomically

REQUIRED_KEYS = ("dataset_name", "dataset_index", "answer_label", "answer", "parsed_outputs", "num_rollouts",
                 "num_correct")


def encode_record(record: dict) -> str:
    """One jsonl line (with its newline); the same record always gives the same bytes."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def _check_record(record: object, where: str, error: type[Exception] = RunFolderError) -> dict:
    """`record` in the results layout, or `error`: a RunFolderError for a line read from a run folder, a
    ValueError for a record this package is about to write (only a bug gets it wrong)."""
    if not isinstance(record, dict):
        raise error(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        raise error(f"{where}: missing key(s) {missing}")
    index = record["dataset_index"]
    if not isinstance(index, int) or isinstance(index, bool):
        raise error(f"{where}: dataset_index must be an integer, got {index!r}")
    if len(record["parsed_outputs"]) != record["num_rollouts"]:
        raise error(f"{where}: {len(record['parsed_outputs'])} parsed_outputs but num_rollouts="
                    f"{record['num_rollouts']}")
    return record


def read_records(path: str | Path) -> list[dict]:
    """All records of a complete results file, checked: valid JSON, the layout's keys, unique indices."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    records, seen = [], {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = _check_record(json.loads(line), where)
            except json.JSONDecodeError as exc:
                raise RunFolderError(f"{where}: not valid JSON ({exc.msg})") from None
            index = record["dataset_index"]
            if index in seen:
                raise RunFolderError(f"{where}: dataset_index {index} already written on line {seen[index]}")
            seen[index] = lineno
            records.append(record)
    return records


class ResultsFile:
    """Append-only jsonl of finished questions, keyed by `dataset_index`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: set[int] = set()
        self._file = None

    def open(self) -> set[int]:
        """Open for appending; returns the `dataset_index` values already finished.

        A last line without its newline is the trace of a crash in the middle of a write: it is cut
        off (that question runs again). Any other bad line is an error naming the line.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done = set()
        if self.path.exists():
            data = self.path.read_bytes()
            keep = data.rfind(b"\n") + 1
            if keep < len(data):
                with self.path.open("r+b") as f:
                    f.truncate(keep)
            for record in read_records(self.path):
                self.done.add(record["dataset_index"])
        self._file = self.path.open("a", encoding="utf-8")
        return set(self.done)

    def append(self, record) -> None:
        """Write one finished question (a dict or a msgspec record); flushed at once so a kill loses at most
        the line being written."""
        if self._file is None:
            raise RuntimeError(f"{self.path}: open() the results file before appending")
        if isinstance(record, msgspec.Struct):
            record = msgspec.to_builtins(record)
        record = _check_record(record, f"record for {self.path}", ValueError)
        index = record["dataset_index"]
        if index in self.done:
            raise ValueError(f"{self.path}: dataset_index {index} is already written; a question is never "
                             "written twice")
        self._file.write(encode_record(record))
        self._file.flush()
        self.done.add(index)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def finalize(self) -> None:
        """Rewrite the file sorted by `dataset_index` (atomically: a crash leaves the old file)."""
        self.close()
        records = sorted(read_records(self.path), key=lambda r: r["dataset_index"])
        write_atomically(self.path, "".join(encode_record(r) for r in records), fsync=True)

    def __enter__(self) -> ResultsFile:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_pass_counts(path: str | Path) -> Iterator[tuple[int, int, int]]:
    """(dataset_index, num_correct, num_rollouts) of every record of a results file."""
    for record in read_records(path):
        yield record["dataset_index"], int(record["num_correct"]), int(record["num_rollouts"])
