"""The report's numbers, recomputed here independently from the jsonl with the pure-Python grader,
and MedVLThinker's published rows."""

from __future__ import annotations

import json
import statistics
from dataclasses import replace

import pytest
from results_helpers import SIX, record, recount, write_results

from medvl_engine.cli import main as cli
from medvl_engine.data import bundled_answers_path, load_bundled
from medvl_engine.evals.evaluate import EvalConfig, eval_data, sections
from medvl_engine.evals.manifest import open_run
from medvl_engine.evals.report import load_reference, reference_rows, write_run_report
from medvl_engine.tables import BENCHMARKS


def _variants(sample, response: str) -> list[str]:
    wrong = next(letter for letter in sample.options if letter != sample.answer_label)
    return [
        response,                                                     # the bundled answer (mostly right)
        sample.answer_label,                                          # bare letter: eval/regrade yes, reward no
        f"<think>x</think><answer> {wrong} </answer>",                # well formed, wrong
        f"So the answer is: {sample.answer_label}",                   # regrade only
        f"<think>t</think>\n<answer>\n{sample.answer_label}\n</answer>",  # multi-line answer: reward falls back
        "I cannot tell.",                                             # no parse anywhere
    ]


def _make_run(folder, n: int, repeats: int, model: str):
    samples = list(load_bundled())
    responses = {json.loads(line)["dataset_index"]: json.loads(line)["response"]
                 for line in bundled_answers_path().read_text().splitlines() if line.strip()}
    # The manifest as `medvl-engine eval` writes it (the model under `run`).
    cfg = EvalConfig(model=model, output=str(folder), data=replace(eval_data(), source="bundled"))
    open_run(folder, "eval", sections(cfg))
    runs = []
    for k in range(repeats):
        rows = []
        for s in samples:
            options = _variants(s, responses[s.dataset_index])
            rows.append(record(s, [options[(s.dataset_index * (k + 2) + j) % len(options)] for j in range(n)]))
        write_results(folder / f"v{k}" / "results.jsonl", rows)
        runs.append(rows)
    return runs


def test_report_numbers_match_an_independent_recount(tmp_path):
    folder = tmp_path / "run"
    runs = _make_run(folder, n=3, repeats=2, model="Qwen/Qwen2.5-VL-3B-Instruct")
    markdown, data = write_run_report(folder)
    assert markdown.startswith("## Qwen/Qwen2.5-VL-3B-Instruct on bundled\n")
    assert data["model"] == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert json.loads((folder / "report.json").read_text()) == json.loads(json.dumps(data))
    assert (folder / "report.md").read_text() == markdown
    assert data["repeats"] == 2 and data["num_rollouts"] == 3 and data["averaged"] == SIX
    assert data["questions"]["pmc_vqa"] == 6 and data["questions"]["GBaker/MedQA-USMLE-4-options"] == 6
    nonzero = 0
    for mode in ("regrade", "eval", "reward"):
        expected = [recount(rows, mode) for rows in runs]
        for metric in ("accuracy", "pass_at_n", "majority_at_n", "no_parse"):
            got = data["modes"][mode][metric]
            for column in expected[0][metric]:
                values = [e[metric][column] for e in expected]
                assert got["runs"][0][column] == pytest.approx(values[0], abs=1e-9), (mode, metric, column)
                assert got["runs"][1][column] == pytest.approx(values[1], abs=1e-9), (mode, metric, column)
                assert got["mean"][column] == pytest.approx(statistics.fmean(values), abs=1e-9)
                assert got["std"][column] == pytest.approx(statistics.stdev(values), abs=1e-9)
                nonzero += values[0] > 0
    assert nonzero > 50  # the hand-made answers exercise every mode and metric, not a table of zeros
    # The three parsers disagree on these answers, as they should.
    means = {m: data["modes"][m]["accuracy"]["mean"]["Avg."] for m in ("regrade", "eval", "reward")}
    assert means["regrade"] > means["eval"] > means["reward"]
    regrade_mean = f"{data['modes']['regrade']['accuracy']['mean']['pmc_vqa']:.2f}"
    assert any(line.startswith("| regrade mean") and regrade_mean in line for line in markdown.splitlines())


def test_published_rows_come_with_their_source():
    reference = load_reference()
    assert "MedVLThinker" in reference["source"]["what"] and "a3163b1" in reference["source"]["what"]
    assert reference["columns"] == [column for _, column in BENCHMARKS] + ["Avg."]
    for row in reference["rows"]:
        six = [row["values"][c] for c in reference["columns"][:-1]]
        # Avg. is the unweighted mean of the six, printed to 2 decimals (catches a mistyped figure).
        assert abs(statistics.fmean(six) - row["values"]["Avg."]) <= 0.0051, row["label"]
    seven_b = reference_rows(["UCSC-VLAA/MedVLThinker-7B-RL_m23k"])
    (table,) = seven_b.values()
    assert table["pmc_vqa"].accuracy == pytest.approx(0.5067) and table.average == pytest.approx(0.5488)
    assert len(reference_rows(["all"])) == len(reference["rows"]) == 25
    assert reference_rows(["gpt-4o"]).keys() == {"GPT-4o (published)"}


def test_report_command_side_by_side_with_published_rows(tmp_path, capsys):
    _make_run(tmp_path / "a", n=1, repeats=1, model="/models/Qwen2.5-VL-3B-Instruct")
    _make_run(tmp_path / "b", n=1, repeats=2, model="/models/other")
    assert cli(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--reference", "gpt-4o"]) == 0
    out = capsys.readouterr().out
    lines = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "a (Qwen2.5-VL-3B-Instruct, 1 run)" in lines and "b (other, 2 runs)" in lines
    assert "49.14" in lines["Qwen2.5-VL-3B-Instruct (published)"]
    assert "63.74" in lines["GPT-4o (published)"]
    assert cli(["report", str(tmp_path / "a")]) == 0
    single = capsys.readouterr().out
    assert "no-parse % regrade" in single and (tmp_path / "a" / "report.json").is_file()
