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


def iter_records(path: str | Path) -> Iterator[tuple[dict, int, int]]:
    """The records of a complete results file one at a time, checked (valid JSON, the layout's keys, unique
    indices), each with its line's byte offset and length: memory flat in the file's size (a pass-rate run of
    PMC-VQA writes ~177k records of ~30 KiB)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    seen: dict[int, int] = {}
    offset = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = _check_record(json.loads(raw.decode("utf-8")), where)
            except json.JSONDecodeError as exc:
                raise RunFolderError(f"{where}: not valid JSON ({exc.msg})") from None
            except UnicodeDecodeError as exc:
                raise RunFolderError(f"{where}: not UTF-8 ({exc.reason})") from None
            index = record["dataset_index"]
            if index in seen:
                raise RunFolderError(f"{where}: dataset_index {index} already written on line {seen[index]}")
            seen[index] = lineno
            yield record, start, len(raw)


def read_records(path: str | Path) -> list[dict]:
    """All records of a complete results file, checked (see `iter_records`)."""
    return [record for record, _, _ in iter_records(path)]


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
            for record, _, _ in iter_records(self.path):
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
        # Sorted by where each line is, not by holding the records: one record in memory at a time.
        order = sorted((record["dataset_index"], start, length) for record, start, length in iter_records(self.path))
        with self.path.open("rb") as source:
            def lines():
                for _, start, length in order:
                    source.seek(start)
                    yield encode_record(json.loads(source.read(length).decode("utf-8")))

            write_atomically(self.path, lines(), fsync=True)

    def __enter__(self) -> ResultsFile:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_pass_counts(path: str | Path) -> Iterator[tuple[int, int, int]]:
    """(dataset_index, num_correct, num_rollouts) of every record of a results file."""
    for record, _, _ in iter_records(path):
        yield record["dataset_index"], int(record["num_correct"]), int(record["num_rollouts"])
