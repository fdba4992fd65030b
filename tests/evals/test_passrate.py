"""`medvl-engine passrate` end to end with the hf backend and a tiny random model, then `curate` on its
output: pass counts by MedVLThinker's offline-eval grading, one seed per question, resume, histogram, a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medvl_engine import grading
from medvl_engine.cli import main as cli
from medvl_engine.data import load_samples
from medvl_engine.evals.passrate import histogram, histogram_text
from medvl_engine.evals.results import read_records
from medvl_engine.rollout.types import derive_seed


def _passrate_args(model_dir, out, *extra):
    return ["passrate", "--model", str(model_dir), "--data.source", "bundled", "--data.ignore-images",
            "--rollout.n", "4", "--rollout.max-response-tokens", "6", "--output", str(out), *extra]


def test_passrate_then_curate(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "passrate"
    assert cli(_passrate_args(tiny_llama_dir, out, "--data.max-samples", "8")) == 0
    printed = capsys.readouterr().out
    rows = read_records(out / "results.jsonl")
    assert len(rows) == 8
    varied = 0
    for r in rows:
        texts = [o["output_text"] for o in r["parsed_outputs"]]
        assert r["num_rollouts"] == 4
        # MedVLThinker's pass counts: its offline-eval grader (first <answer> block or the whole
        # answer, no format gate), not the RL reward.
        strict = [grading.grade_answer(grading.extract_eval(t), r["answer"], r["answer_label"]) for t in texts]
        assert [o["is_correct"] for o in r["parsed_outputs"]] == strict and r["num_correct"] == sum(strict)
        varied += len(set(texts)) > 1
    assert varied >= 6  # temperature 1.0: the n answers of a question differ

    counts = [r["num_correct"] for r in rows]
    assert (out / "histogram.txt").read_text() == histogram_text(histogram(counts, 4))
    assert "| pass count (of 4) |" in printed and "8 questions" in printed
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "passrate"
    rollout = manifest["identity"]["rollout"]
    decoding = {k: rollout[k] for k in ("n", "temperature", "top_p", "top_k", "max_response_tokens", "seed")}
    assert decoding == {"n": 4, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_response_tokens": 6, "seed": 42}
    # Question k is stream position k and samples with the seed derived from (run seed, k).
    assert [r["position"] for r in rows] == list(range(8))
    assert [r["seed"] for r in rows] == [derive_seed(42, k) for k in range(8)]

    # Each question samples with its own seed: a run over the first 4 questions answers them exactly as
    # the run over 8 did, whatever ran before them.
    first = tmp_path / "first4"
    assert cli(_passrate_args(tiny_llama_dir, first, "--data.max-samples", "4")) == 0
    assert read_records(first / "results.jsonl") == rows[:4]

    # Resuming a finished run generates nothing and leaves the file as it was.
    before = (out / "results.jsonl").read_bytes()
    assert cli(_passrate_args(tiny_llama_dir, out, "--data.max-samples", "8")) == 0
    assert (out / "results.jsonl").read_bytes() == before
    assert len(json.loads((out / "manifest.json").read_text())["attempts"]) == 2

    curated = tmp_path / "curated"
    assert cli(["curate", "--source", "bundled", "--pass-counts", str(out), "--output", str(curated),
                "--min-pass", "0", "--max-pass", "4", "--band-of", "4", "--order", "hard_to_easy"]) == 0
    summary = json.loads((curated / "curation.json").read_text())
    assert (summary["kept"], summary["missing"], summary["num_rollouts"]) == (8, 37 - 8, 4)
    samples = load_samples(curated / "dataset", split="train")
    kept_counts = [dict(zip([r["dataset_index"] for r in rows], counts))[s.dataset_index] for s in samples]
    assert kept_counts == sorted(kept_counts) and len(samples) == 8


def test_histogram_counts_every_pass_count():
    hist = histogram([0, 0, 3, 16, 7, 7, 7], 16)
    assert hist.shape == (17,) and hist.sum() == 7
    assert hist[0] == 2 and hist[7] == 3 and hist[16] == 1 and hist[3] == 1
    text = histogram_text(hist)
    assert "| 7 | 3 | 42.9 |" in text and "none solved 2; all solved 1" in text
    assert np.array_equal(histogram([], 4), np.zeros(5, dtype=np.int64))


def test_pass_counts_are_graded_like_medvlthinkers_no_format_gate(tmp_path):
    """MedVLThinker's pass counts come from its offline-eval grader: a bare letter without tags counts."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
    from scripted_backend import ScriptedBackend

    from medvl_engine.evals.passrate import PassrateConfig, estimate
    from medvl_engine.rollout.config import DataConfig, RolloutConfig

    answers = {0: "label", 1: "<answer>label</answer>"}  # sample k of 4: k 0 bare, k 1 tagged, k 2-3 wrong

    def answer(request, k):
        return answers.get(k, "Z").replace("label", request.sample.answer_label)

    class Renderer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "".join(str(m["content"]) for m in messages)

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2, 3]}

    (tmp_path / "model").mkdir()
    cfg = PassrateConfig(model=str(tmp_path / "model"), output=str(tmp_path / "run"),
                         data=DataConfig(source="bundled", ignore_images=True, max_samples=3, shuffle=False),
                         rollout=RolloutConfig(n=4, temperature=1.0))
    estimate(cfg, backends=[ScriptedBackend("b", answer=answer)], renderer=Renderer())
    rows = read_records(tmp_path / "run" / "results.jsonl")
    assert [r["num_correct"] for r in rows] == [2, 2, 2]
