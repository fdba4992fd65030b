"""`medvl-engine score`: grade a file of model answers against a dataset and print the accuracy table.

    medvl-engine score answers.jsonl --source UCSC-VLAA/MedVLThinker-Eval --mode regrade --output scored.jsonl

The answers file is jsonl in either layout, line by line:
- ``{"dataset_index": 12, "response": "<think> ... </think>\\n<answer> B </answer>"}``, or
- MedVLThinker's eval_results.jsonl: ``{"dataset_index": 12, "parsed_outputs": [{"output_text": ...}, ...]}``
  with one entry per rollout.
Every response is scored in one batched native call (`medvl_engine.rewards.score_samples`). A question's
accuracy is the mean over its responses, a dataset's the mean over its questions (MedVLThinker's
`average_num_correct`), shown in MedVLThinker's table order.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from medvl_engine.config import param
from medvl_engine.data import SampleSet, load_bundled, load_samples
from medvl_engine.errors import AnswerFileError, ConfigError
from medvl_engine.files import write_atomically
from medvl_engine.rewards import score_samples
from medvl_engine.tables import AccuracyTable, accuracy_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AnswerRecord:
    """One line of an answers file: the question it answers and its responses (one, or one per rollout)."""

    line: int
    dataset_index: int
    responses: list[str]
    source: dict
    layout: str  # "response" or "eval_results"

    def __post_init__(self) -> None:
        if self.layout not in ("response", "eval_results"):
            raise ValueError(f"layout must be 'response' or 'eval_results', got {self.layout!r}")
        if not self.responses:
            raise ValueError(f"line {self.line}: no responses")


@dataclass(frozen=True)
class ScoredAnswers:
    """The scored lines (ready for jsonl) and the per-dataset table."""

    rows: list[dict]
    table: AccuracyTable
    responses: int
    questions: int
    dataset_questions: int
    mode: str


def read_answers(path: str | Path) -> list[AnswerRecord]:
    path = Path(path)
    if not path.is_file():
        raise AnswerFileError(f"{path}: answers file not found")
    records = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                records.append(_parse_line(line, f"{path}: line {line_number}", line_number))
    if not records:
        raise AnswerFileError(f"{path}: no answers (the file is empty)")
    return records


def _parse_line(line: str, where: str, line_number: int) -> AnswerRecord:
    try:
        obj = json.loads(line.rstrip("\r\n"))
    except json.JSONDecodeError as exc:
        raise AnswerFileError(f"{where}: not valid JSON ({exc.msg}: column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise AnswerFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "dataset_index" not in obj:
        raise AnswerFileError(f"{where}: missing field 'dataset_index'")
    index = obj["dataset_index"]
    if isinstance(index, bool) or not isinstance(index, int):
        raise AnswerFileError(f"{where}: field 'dataset_index' must be an integer, got {index!r}")
    if "parsed_outputs" in obj:
        outputs = obj["parsed_outputs"]
        if not isinstance(outputs, list) or not outputs:
            raise AnswerFileError(f"{where}: field 'parsed_outputs' must be a non-empty list")
        responses = []
        for i, output in enumerate(outputs):
            text = output.get("output_text") if isinstance(output, dict) else None
            if not isinstance(text, str):
                raise AnswerFileError(f"{where}: field 'parsed_outputs'[{i}].output_text must be a string")
            responses.append(text)
        return AnswerRecord(line_number, index, responses, obj, "eval_results")
    if "response" not in obj:
        raise AnswerFileError(f"{where}: missing field 'response' (or 'parsed_outputs' for eval_results.jsonl)")
    if not isinstance(obj["response"], str):
        raise AnswerFileError(f"{where}: field 'response' must be a string, got {type(obj['response']).__name__}")
    return AnswerRecord(line_number, index, [obj["response"]], obj, "response")


def score_answers(
    records: Sequence[AnswerRecord], samples: SampleSet, *, mode: str = "regrade", threads: int | None = None,
    source: str = "answers",
) -> ScoredAnswers:
    """Score every response of `records` against its sample in one batch; `source` names the answers
    file in errors."""
    by_index = samples.by_index()
    flat_responses, flat_samples = [], []
    for record in records:
        sample = by_index.get(record.dataset_index)
        if sample is None:
            raise AnswerFileError(
                f"{source}: line {record.line}: dataset_index {record.dataset_index} is not in {samples.name} "
                f"({len(samples)} questions)"
            )
        flat_responses += record.responses
        flat_samples += [sample] * len(record.responses)
    result = score_samples(flat_responses, flat_samples, mode=mode, threads=threads)

    rows, per_question, start = [], {}, 0
    for record in records:
        sample = by_index[record.dataset_index]
        span = range(start, start + len(record.responses))
        start = span.stop
        scored = [
            {
                "parsed": result.parsed[i],
                "letter": result.letter[i],
                "correct": bool(result.correct[i]),
                "format_ok": bool(result.format_ok[i]),
                "reward": float(result.reward[i]),
            }
            for i in span
        ]
        rows.append(_scored_row(record, sample, scored, mode))
        per_question.setdefault(record.dataset_index, []).extend(s["correct"] for s in scored)
    table = accuracy_table(
        (by_index[index].dataset_name or samples.name, sum(hits) / len(hits)) for index, hits in per_question.items()
    )
    return ScoredAnswers(rows, table, len(flat_responses), len(per_question), len(samples), mode)


def _scored_row(record: AnswerRecord, sample, scored: list[dict], mode: str) -> dict:
    truth = {"dataset_name": sample.dataset_name, "answer_label": sample.answer_label, "answer": sample.answer}
    if record.layout == "response":
        return {**record.source, **truth, "mode": mode, **scored[0]}
    outputs = []
    for output, s in zip(record.source["parsed_outputs"], scored):
        # MedVLThinker's regrader keeps the mapped option letter in pred_letter, else the raw prediction.
        outputs.append({**output, **s, "pred_letter": s["letter"] or s["parsed"], "is_correct": s["correct"]})
    num_correct = sum(s["correct"] for s in scored)
    return {
        **record.source, **truth, "mode": mode, "parsed_outputs": outputs, "num_rollouts": len(scored),
        "num_correct": num_correct, "average_num_correct": num_correct / len(scored),
    }


def _json_line(row: dict) -> str:
    line = json.dumps(row, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        # A lone surrogate (e.g. a response cut inside a UTF-16 pair) is a valid str but has no UTF-8 form:
        # this line escapes it (`\ud800`), which reads back as the same str.
        line = json.dumps(row)
    return line + "\n"


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    return write_atomically(path, "".join(_json_line(row) for row in rows))


def summary_line(scored: ScoredAnswers, dataset_name: str, *, modes: str | None = None) -> str:
    return (
        f"scored {scored.responses} responses to {scored.questions} of {scored.dataset_questions} questions "
        f"of {dataset_name} ({modes or 'mode: ' + scored.mode})"
    )


@dataclass
class ScoreConfig:
    """Score a file of answers against the questions they answer."""

    answers: str = param(help="jsonl of {dataset_index, response} lines or MedVLThinker's eval_results.jsonl",
                         positional=True)
    source: str = param("bundled", "the questions: `bundled`, a .jsonl or .parquet file, a save_to_disk folder or "
                        "a hub name (the same spelling as `--data.source` of the other commands)")
    split: str = param("test", "split of a hub dataset or a saved DatasetDict")
    skip_invalid: bool = param(False, "drop dataset rows that do not fit, and list them")
    mode: Literal["reward", "eval", "regrade"] = param(
        "regrade", "reward: the strict RL reward; eval: MedVLThinker's offline evaluation; regrade: the looser rule "
        "behind its published tables")
    output: str = param("", "write the scored answers to this jsonl")
    table_json: str = param("", "write the accuracy table to this JSON file")
    threads: int = param(0, "scoring threads (0: every core)")

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config as config_lib

    config_lib.add_arguments(parser, ScoreConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config as config_lib

    args = config_lib.from_args(ScoreConfig, args)
    threads = args.threads or None
    # A DataError or AnswerFileError is one line and exit 2 through the command line's error handler.
    if args.source == "bundled":
        samples = load_bundled(skip_invalid=args.skip_invalid)
    else:
        samples = load_samples(args.source, split=args.split, skip_invalid=args.skip_invalid)
    if samples.skipped:
        logger.warning("%s", samples.skipped_summary())
    scored = score_answers(read_answers(args.answers), samples, mode=args.mode, threads=threads, source=args.answers)
    print(summary_line(scored, samples.name))
    print(scored.table.to_markdown())
    if args.output:
        logger.info("wrote %s", write_jsonl(args.output, scored.rows))
    if args.table_json:
        path = write_atomically(args.table_json, json.dumps({"mode": args.mode, **scored.table.to_dict()}, indent=2)
                                + "\n")
        logger.info("wrote %s", path)
    return 0
