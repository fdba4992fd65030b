"""Hand-made results files, and the report's metrics recounted with the pure-Python grader (the oracle)."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path

from medvl_engine import grading
from medvl_engine.tables import BENCHMARKS

SIX = [name for name, _ in BENCHMARKS]


def write_results(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def record(sample, texts: list[str], *, correct: list[bool] | None = None) -> dict:
    """A results line for `sample` with the given answer texts (is_correct as given, else False)."""
    correct = correct or [False] * len(texts)
    return {
        "dataset_name": sample.dataset_name,
        "dataset_index": sample.dataset_index,
        "answer_label": sample.answer_label,
        "answer": sample.answer,
        "options": sample.options,
        "prompts": "",
        "parsed_outputs": [{"output_text": t, "pred_letter": "", "is_correct": c} for t, c in zip(texts, correct)],
        "num_rollouts": len(texts),
        "num_correct": sum(correct),
    }


def _letter(pred: str, options: dict) -> str:
    return next((letter for letter, text in options.items() if grading.grade_answer(pred, text, letter)), "")


def recount(rows: list[dict], mode: str) -> dict[str, dict[str, float]]:
    """Every metric of the report, per dataset and Avg. (percent), counted here with the pure-Python grader."""
    per: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        hits, keys, unparsed = 0, [], 0
        for out in r["parsed_outputs"]:
            text = out["output_text"]
            pred = grading.EXTRACT[mode](text)
            ok = grading.grade_answer(pred, r["answer"], r["answer_label"])
            letter = _letter(pred, r["options"])
            if mode == "reward" and not grading.format_ok(text):
                ok, letter = False, None  # no answer: one shared vote that matches no label
            hits += ok
            unparsed += not letter
            # MedVLThinker's regrader votes with the letter, else the extracted string as it is.
            keys.append(pred if letter == "" else letter)
        n = len(keys)
        d = per.setdefault(r["dataset_name"], {"accuracy": [], "pass_at_n": [], "majority_at_n": [], "no_parse": []})
        d["accuracy"].append(hits / n)
        d["pass_at_n"].append(hits > 0)
        d["majority_at_n"].append(Counter(keys).most_common(1)[0][0] == r["answer_label"])
        d["no_parse"].append(unparsed / n)
    out = {}
    for metric in ("accuracy", "pass_at_n", "majority_at_n", "no_parse"):
        row = {name: 100 * statistics.fmean(v[metric]) for name, v in per.items()}
        row["Avg."] = statistics.fmean(row[name] for name in SIX)
        out[metric] = row
    return out
