"""Native answer parser against the pure-Python reference: responses/s and MB/s per mode.

Generates a corpus of realistic reasoning responses (100k by default, 300-3000 characters, grouped 8
per question as in GRPO / pass-rate sampling; mixed correct, wrong and malformed; a few percent with
non-Latin-1 text), scores it with `medvl_engine.grading.score` (the reference, timed once) and with
`medvl_engine.rewards.score` on one thread and on every core, prints a table and writes one JSON row
per measurement.

    python benchmarks/bench_parser.py [--responses 100000] [--out benchmarks/out/bench_parser.jsonl]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from medvl_engine import grading, rewards
from medvl_engine.benchmarking import environment, format_table, median_time, write_rows

WORDS = (
    "patient presents with acute chest pain dyspnea the lesion is hyperdense on CT imaging suggests "
    "infarction differential diagnosis includes pneumonia effusion edema biopsy shows granuloma "
    "histology confirms carcinoma lymphocytes infiltrate the stroma therefore most likely option "
    "however we should consider anatomy of the left ventricle MRI T2 signal bright contrast enhancing "
    "mass in the temporal lobe pathology slide stained with H&E reveals"
).split()
RARE = ("≥", "→", "μm", "α-actin", "β-blocker", "Ménière", "Sjögren", "°C", "“quoted”", "🫀")
OPTION_TEXTS = (
    "Hyperdense", "Hypodense", "Myocardial infarction", "Pulmonary embolism", "Yes", "No", "Ménière disease",
    "Sjögren syndrome", "Adenocarcinoma", "Squamous cell carcinoma", "Left ventricle", "Right atrium",
    "Granulomatous inflammation", "Normal tissue", "T2 hyperintense lesion", "Β-thalassemia",
)


def reasoning(rng: random.Random, length: int) -> str:
    parts: list[str] = []
    size = 0
    while size < length:
        word = rng.choice(RARE) if rng.random() < 0.002 else rng.choice(WORDS)
        parts.append(word)
        size += len(word) + 1
        if rng.random() < 0.08:
            parts.append(".\n" if rng.random() < 0.3 else ".")
    return " ".join(parts)[:length]


def response(rng: random.Random, options: dict[str, str], label: str) -> str:
    body = reasoning(rng, rng.randint(260, 2900))
    pick = label if rng.random() < 0.4 else rng.choice(list(options))
    answer = rng.choice((pick, pick, options[pick], f"{pick}. {options[pick]}"))
    kind = rng.random()
    if kind < 0.70:
        return f"<think> {body} </think>\n<answer> {answer} </answer>"
    if kind < 0.75:
        return f"<think> {body} </think>\n<answer> {answer} </answer>\n"
    if kind < 0.80:
        return f"<think> {body} </think>\n<answer>\n{answer}\n</answer>"
    if kind < 0.88:
        return f"{body}\nThe answer is: {answer}"
    if kind < 0.93:
        return f"{body}\nAnswer: {answer}"
    if kind < 0.97:
        return f"<think> {body} </think>\n<answer> {answer}"
    return body


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[str], list[str], list[dict[str, str]]]:
    rng = random.Random(seed)
    responses, answers, labels, options = [], [], [], []
    group = 8
    for _ in range(0, n, group):
        letters = "ABCDE"[: rng.choice((2, 4, 4, 5))]
        question_options = dict(zip(letters, rng.sample(OPTION_TEXTS, len(letters))))
        label = rng.choice(letters)
        for _ in range(group):
            responses.append(response(rng, question_options, label))
            # One Sample per question: the group shares its answer, label and options objects.
            answers.append(question_options[label])
            labels.append(label)
            options.append(question_options)
    return responses[:n], answers[:n], labels[:n], options[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--responses", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/out/bench_parser.jsonl")
    args = parser.parse_args()

    responses, answers, labels, options = corpus(args.responses)
    megabytes = sum(len(r.encode("utf-8", "surrogatepass")) for r in responses) / 1e6
    cores = os.cpu_count() or 1
    shape = {"responses": len(responses), "megabytes": round(megabytes, 2), "cores": cores}
    rows = []
    for mode in rewards.MODES:
        start = time.perf_counter()
        expected = grading.score(responses, answers, labels, options, mode=mode)
        reference_s = time.perf_counter() - start
        runs = [("python reference", 1, reference_s)]
        for threads in sorted({1, cores}):
            def run(mode=mode, threads=threads):
                return rewards.score(responses, answers, labels, options, mode=mode, threads=threads)

            got = run()
            if got.parsed != expected.parsed or got.letter != expected.letter or (got.reward != expected.reward).any():
                raise SystemExit(f"native and reference disagree in mode {mode} with {threads} threads")
            seconds = median_time(run, repeats=args.repeats)
            runs.append(("native", threads, seconds))
        for impl, threads, seconds in runs:
            rows.append({
                "bench": "parser", "mode": mode, "impl": impl, "threads": threads, **shape,
                "seconds": seconds, "responses_per_s": len(responses) / seconds, "mb_per_s": megabytes / seconds,
                "speedup_vs_reference": reference_s / seconds,
                "accuracy": float(expected.reward.mean()),
            })
    print(environment()["device"], f"{len(responses)} responses, {megabytes:.1f} MB")
    print(format_table(rows, ["mode", "impl", "threads", "seconds", "responses_per_s", "mb_per_s",
                              "speedup_vs_reference"]))
    print(f"wrote {write_rows(args.out, rows)}")


if __name__ == "__main__":
    main()
