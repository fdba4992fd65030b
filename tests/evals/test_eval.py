"""`medvl-engine eval` end to end on the bundled data with the hf backend and tiny random models:
the results layout, the manifest, the report recomputed from the jsonl, and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
from results_helpers import recount

from medvl_engine import grading
from medvl_engine.cli import main as cli
from medvl_engine.data import load_bundled
from medvl_engine.evals.results import read_records
from medvl_engine.prompts import render_prompt

KEYS = {"dataset_name", "dataset_index", "answer_label", "answer", "options", "prompts", "parsed_outputs",
        "num_rollouts", "num_correct", "position", "seed"}


def _eval_args(model_dir, out, *extra):
    return ["eval", "--model", str(model_dir), "--data.source", "bundled", "--data.ignore-images", "--output", str(out),
            *extra]


def test_eval_command_end_to_end(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "run"
    assert cli(_eval_args(tiny_llama_dir, out, "--rollout.max-response-tokens", "8", "--repeats", "2")) == 0
    printed = capsys.readouterr().out
    assert "| regrade mean" in printed and "| questions" in printed

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    samples = [replace(s, images=[]) for s in load_bundled()]
    repeats = [read_records(out / f"v{k}" / "results.jsonl") for k in range(2)]
    for rows in repeats:
        assert [r["dataset_index"] for r in rows] == sorted(s.dataset_index for s in samples)
        for r, s in zip(rows, samples):
            assert set(r) == KEYS
            assert r["prompts"] == render_prompt(tokenizer, s)
            assert (r["answer_label"], r["answer"], r["options"], r["dataset_name"]) == (
                s.answer_label, s.answer, s.options, s.dataset_name)
            (output,) = r["parsed_outputs"]
            assert r["num_rollouts"] == 1 and 1 <= output["num_tokens"] <= 8
            assert r["seed"] == -1  # greedy: no sampling seed
            # Stored flags are MedVLThinker's offline-eval grading of the stored text, scored once by the pool.
            assert output["parsed"] == grading.extract_eval(output["output_text"])
            assert output["pred_letter"] == (output["letter"] or output["parsed"])
            assert output["letter"] == "" or s.options[output["letter"]] is not None
            assert output["is_correct"] == grading.grade_answer(output["parsed"], s.answer, s.answer_label)
            assert r["num_correct"] == int(output["is_correct"])
    # Greedy decoding: the two repeats answer identically.
    assert [r["parsed_outputs"] for r in repeats[0]] == [r["parsed_outputs"] for r in repeats[1]]

    manifest = json.loads((out / "manifest.json").read_text())
    identity = manifest["identity"]
    assert identity["run"]["model"] == str(tiny_llama_dir) and identity["rollout"]["backend"] == "hf"
    keys = ("n", "temperature", "top_p", "top_k", "max_response_tokens", "seed")
    decoding = {k: identity["rollout"][k] for k in keys}
    assert decoding == {"n": 1, "temperature": 0.0, "top_p": 1.0, "top_k": -1, "max_response_tokens": 8, "seed": 42}
    assert identity["data"]["source"] == "bundled" and identity["data"]["ignore_images"] is True
    (attempt,) = manifest["attempts"]
    assert {"commit", "date", "device", "versions"} <= set(attempt)
    assert {"torch", "transformers"} <= set(attempt["versions"])

    report = json.loads((out / "report.json").read_text())
    for mode in ("regrade", "eval", "reward"):
        for k, rows in enumerate(repeats):
            expected = recount(rows, mode)
            got = report["modes"][mode]
            for metric in ("accuracy", "no_parse"):
                for column, value in expected[metric].items():
                    assert got[metric]["runs"][k][column] == pytest.approx(value, abs=1e-9)
        assert report["modes"][mode]["accuracy"]["std"]["Avg."] == 0.0


def test_resume_after_a_kill_gives_the_same_file(tiny_llama_dir, tmp_path, capsys):
    args = ["--rollout.max-response-tokens", "24", "--rollout.max-batch", "1"]
    killed = tmp_path / "killed"
    results = killed / "v0" / "results.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "medvl_engine.cli", *_eval_args(tiny_llama_dir, killed, *args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if results.is_file() and results.read_bytes().count(b"\n") >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    partial = read_records(results) if results.read_bytes().endswith(b"\n") else None
    assert 3 <= results.read_bytes().count(b"\n") < 37, "the kill must land mid-run"

    assert cli(_eval_args(tiny_llama_dir, killed, *args)) == 0
    fresh = tmp_path / "fresh"
    assert cli(_eval_args(tiny_llama_dir, fresh, *args)) == 0
    assert results.read_bytes() == (fresh / "v0" / "results.jsonl").read_bytes()
    final = read_records(results)
    assert len(final) == 37 and len({r["dataset_index"] for r in final}) == 37
    if partial is not None:  # what the killed run wrote survives unchanged
        by_index = {r["dataset_index"]: r for r in final}
        assert all(by_index[r["dataset_index"]] == r for r in partial)
    assert len(json.loads((killed / "manifest.json").read_text())["attempts"]) == 2

    # Resuming with other settings would mix two configurations in one file: refused, naming each change.
    capsys.readouterr()
    assert cli(_eval_args(tiny_llama_dir, killed, "--rollout.max-batch", "1", "--rollout.max-response-tokens",
                          "12")) == 2
    assert "rollout.max_response_tokens: 24 in the folder, 12 now" in capsys.readouterr().err
    # hf greedy answers depend on the batch they were padded in: another --rollout.max-batch is refused too.
    assert cli(_eval_args(tiny_llama_dir, killed, "--rollout.max-batch", "4", "--rollout.max-response-tokens",
                          "24")) == 2
    assert "rollout.max_batch: 1 in the folder, 4 now" in capsys.readouterr().err


def test_eval_with_images_on_a_tiny_qwen2_5_vl(tmp_path):
    from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer, tiny_qwen2_5_vl

    from medvl_engine.evals.evaluate import EvalConfig, evaluate
    from medvl_engine.rollout.config import DataConfig, RolloutConfig
    from medvl_engine.rollout.hf_backend import HFBackend

    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    backend = HFBackend(tiny_qwen2_5_vl(tokenizer), processor, max_batch=4)
    cfg = EvalConfig(model="tiny-qwen2.5-vl", output=str(tmp_path / "vl"),
                     data=DataConfig(source="bundled", subset=["slake_closed", "MMMU-medical"], max_samples=4,
                                     shuffle=False),
                     rollout=RolloutConfig(n=1, temperature=0.0, max_response_tokens=6))
    stats, markdown = evaluate(cfg, backends=[backend], renderer=processor)
    assert stats[0].written == 4 and not stats[0].failed
    by_index = load_bundled().by_index()
    rows = read_records(tmp_path / "vl" / "v0" / "results.jsonl")
    assert len(rows) == 4 and {r["dataset_name"] for r in rows} <= {"slake_closed", "MMMU-medical"}
    for r in rows:
        images = len(by_index[r["dataset_index"]].images)
        assert images >= 1
        assert r["prompts"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                                       + "<|vision_start|><|image_pad|><|vision_end|>" * images)
    header = next(line for line in markdown.splitlines() if line.startswith("| ") and "Avg." in line)
    columns = {"slake_closed": "SLAKE", "MMMU-medical": "MMMU"}
    assert [c.strip() for c in header.split("|")[2:-2]] == [columns[n] for n in ("MMMU-medical", "slake_closed")
                                                            if n in {r["dataset_name"] for r in rows}]
