"""`medvl-engine bench` end to end on the CPU: the quickest benchmarks run from the repository's
benchmarks/ folder, their JSON rows land in one file and in one printed table, GPU-only ones are
skipped without CUDA, and a failing script is reported with exit status 1."""

from __future__ import annotations

import json
import os

import pytest

from medvl_engine.bench import BENCHMARKS, default_benchmarks_dir, table_rows
from medvl_engine.cli import main as cli


def cpu_only() -> bool:
    import torch

    return not torch.cuda.is_available()


def test_quick_parser_and_wire_write_one_json_file_and_one_table(tmp_path, capsys):
    output = tmp_path / "bench.json"
    names = ["parser", "wire"] + (["kernels"] if cpu_only() else [])
    assert cli(["bench", "--benchmarks", *names, "--output", str(output)]) == 0
    record = json.loads(output.read_text())
    results = {r["name"]: r for r in record["benchmarks"]}
    assert list(results) == names
    printed = capsys.readouterr()
    table = printed.out

    parser = results["parser"]
    assert parser["status"] == "ok" and "--responses" in parser["command"]
    cores = os.cpu_count() or 1
    # Per grading mode: the Python reference and the native parser on one thread and on every core.
    assert len(parser["rows"]) == 3 * (1 + len({1, cores}))
    for row in parser["rows"]:
        assert row["bench"] == "parser" and row["responses"] == 2000 and row["responses_per_s"] > 0
        assert row["device"] == record["environment"]["device"] and row["commit"]
        case = f"{row['mode']} {row['impl']} {row['threads']}"
        line = next(line for line in table.splitlines() if f" {case} |" in line)
        assert "responses_per_s" in line and line.lstrip("| ").startswith("parser")

    wire = results["wire"]
    assert wire["status"] == "ok"
    assert {(r["images"], r["format"]) for r in wire["rows"]} == {
        (0, "raw"), (1, "raw"), (1, "png"), (3, "raw"), (3, "png"), (7, "raw"), (7, "png")}
    assert all(r["n"] == 2 and r["tokens"] == 128 and r["side"] == 64 for r in wire["rows"])

    if cpu_only():
        assert results["kernels"]["status"] == "skipped: no GPU" and not results["kernels"]["rows"]
        assert any("kernels" in line and "skipped: no GPU" in line for line in table.splitlines())
    assert record["config"]["quick"] is True and f"wrote {output}" in printed.err and "wrote" not in table


@pytest.mark.slow
def test_quick_transport_compares_the_channel_with_its_baselines(tmp_path):
    output = tmp_path / "bench.json"
    assert cli(["bench", "--benchmarks", "transport", "--output", str(output)]) == 0
    (result,) = json.loads(output.read_text())["benchmarks"]
    assert {(r["method"], r["link"]) for r in result["rows"]} == {
        ("channel", "ipc"), ("channel", "tcp"), ("zmq-push", "ipc"), ("zmq-push", "tcp"), ("mp-queue", "pipe")}
    assert all(r["groups"] == 120 and r["groups_per_s"] > 0 for r in result["rows"])


def test_a_failing_benchmark_is_reported_and_fails_the_command(tmp_path, capsys):
    folder = tmp_path / "benchmarks"
    folder.mkdir()
    (folder / BENCHMARKS["parser"].script).write_text("import sys\nsys.exit('the parser corpus is empty')\n")
    output = tmp_path / "bench.json"
    assert cli(["bench", "--benchmarks", "parser", "--benchmarks-dir", str(folder), "--output", str(output)]) == 1
    (result,) = json.loads(output.read_text())["benchmarks"]
    assert result["status"] == "failed (exit 1): the parser corpus is empty" and result["rows"] == []
    assert "failed (exit 1): the parser corpus is empty" in capsys.readouterr().out


def test_the_scripts_are_found_next_to_the_package_or_the_error_says_where_to_point(tmp_path, capsys):
    assert all((default_benchmarks_dir() / b.script).is_file() for b in BENCHMARKS.values())
    assert cli(["bench", "--benchmarks-dir", str(tmp_path / "nowhere"), "--output", str(tmp_path / "b.json")]) == 2
    assert "not the wheel; give --benchmarks-dir" in capsys.readouterr().err
    assert cli(["bench", "--benchmarks", "learner", "--output", str(tmp_path / "b.json")]) == 2
    assert "--benchmarks ['learner']: choose from parser, wire" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_the_table_writes_large_and_small_numbers_alike():
    result = {"name": "parser", "status": "ok",
              "rows": [{"mode": "reward", "impl": "native", "threads": 1, "responses_per_s": 42_300.5,
                        "mb_per_s": 1651.2, "speedup_vs_reference": 0.0123},
                       {"mode": "reward", "impl": "native", "threads": 2, "responses_per_s": 1_003_925.0}]}
    first, second = (row["result"] for row in table_rows([result]))
    assert first == "responses_per_s 42,300, mb_per_s 1651, speedup_vs_reference 0.0123"
    assert second == "responses_per_s 1,003,925"
