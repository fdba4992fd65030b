"""The Python API (`from medvl_engine import score, evaluate, passrate, curate`): cheap to import, the same
run folders as the commands, and usable inside a running event loop (a Jupyter cell)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

import medvl_engine
from medvl_engine.evals.results import read_records

BUNDLED_TEXT = {"source": "bundled", "ignore_images": True}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    from tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread on a loaded 2-core machine (see tests/evals/conftest.py)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_importing_the_package_loads_no_torch_and_the_api_on_first_use():
    code = ("import sys, medvl_engine; assert 'torch' not in sys.modules; "
            "assert 'medvl_engine.api' not in sys.modules; "
            "from medvl_engine import score, evaluate, passrate, curate; "
            "assert 'torch' not in sys.modules, 'the API names must not pull torch in'; "
            "print(score.__module__, evaluate.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["medvl_engine.rewards", "medvl_engine.api"]


def test_the_api_names_are_listed_and_documented_and_unknown_names_fail():
    for name in ("score", "evaluate", "passrate", "curate"):
        assert name in dir(medvl_engine) and name in medvl_engine.__all__
        assert getattr(medvl_engine, name).__doc__
    with pytest.raises(AttributeError, match="no attribute 'scor'"):
        medvl_engine.scor  # noqa: B018


def test_score_grades_a_batch():
    from medvl_engine import score

    result = score(["<think>x</think>\n<answer> B </answer>", "<answer>B</answer>", "B. No"],
                   ["No"] * 3, ["B"] * 3, [{"A": "Yes", "B": "No"}] * 3, mode="reward")
    assert result.reward.tolist() == [1.0, 0.0, 0.0]  # the format gate, as MedVLThinker's RL reward
    assert result.correct.tolist() == [True, True, True]
    assert result.letter == ["B", "B", "B"]


def test_settings_are_checked_as_on_the_command_line(tmp_path):
    from medvl_engine import EvalConfig, evaluate

    with pytest.raises(ValueError, match="model: is required"):
        evaluate(output=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['sed'\]"):
        evaluate(model="m", output=str(tmp_path / "run"), rollout={"sed": 1})
    with pytest.raises(TypeError, match="expected a EvalConfig"):
        evaluate({"model": "m"})
    # A config and keywords: the keywords win, the config's other values stay.
    from medvl_engine.api import _config

    base = EvalConfig(model="m", output="o", repeats=3)
    cfg = _config(EvalConfig, base, {"rollout": {"max_response_tokens": 8}, "output": "p"})
    assert (cfg.model, cfg.output, cfg.repeats, cfg.rollout.max_response_tokens, cfg.rollout.seed) == (
        "m", "p", 3, 8, 42)
    assert not list(tmp_path.iterdir())  # nothing was written for a refused config


def test_evaluate_inside_a_running_event_loop(tiny_llama_dir, tmp_path):
    """A Jupyter cell runs inside an event loop; `asyncio.run` there raises "cannot be called from a running
    event loop". The API's evaluate runs its generation on a fresh loop in a worker thread instead."""
    from medvl_engine import evaluate

    async def cell():
        asyncio.get_running_loop()  # as in a notebook: a loop is running here
        return evaluate(model=str(tiny_llama_dir), output=str(tmp_path / "eval"),
                        data={**BUNDLED_TEXT, "max_samples": 3}, rollout={"max_response_tokens": 4})

    run = asyncio.run(cell())
    rows = read_records(tmp_path / "eval" / "v0" / "results.jsonl")
    assert len(rows) == 3 and all(r["num_rollouts"] == 1 for r in rows)
    assert run.output == tmp_path / "eval" and len(run.stats) == 1 and run.stats[0].written == 3
    assert "| questions " in run.report and run._repr_markdown_() == run.report
    assert run.report == (tmp_path / "eval" / "report.md").read_text()


def test_passrate_then_curate_inside_a_running_event_loop(tiny_llama_dir, tmp_path):
    from medvl_engine import curate, passrate

    async def cell():
        counts = passrate(model=str(tiny_llama_dir), output=str(tmp_path / "pr"),
                          data={**BUNDLED_TEXT, "max_samples": 3}, rollout={"n": 16, "max_response_tokens": 2})
        kept = curate(source="bundled", pass_counts=str(counts.output), output=str(tmp_path / "curated"),
                      min_pass=0, max_pass=16)
        return counts, kept

    counts, kept = asyncio.run(cell())
    rows = read_records(tmp_path / "pr" / "results.jsonl")
    assert counts.pass_counts == {r["dataset_index"]: r["num_correct"] for r in rows} and len(rows) == 3
    assert counts.num_samples == 16 and counts.stats.written == 3
    assert "| pass count (of 16) |" in counts.histogram
    summary = json.loads((tmp_path / "curated" / "curation.json").read_text())
    assert kept.kept == summary["kept"] == 3 and summary["num_rollouts"] == 16
