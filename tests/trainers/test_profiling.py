"""Profiling: `profile.steps` is checked when the config is built, a tiny colocated GRPO run with
`profile.steps 2-2` writes a Chrome trace of that step holding the engine's named ranges, and its
timeline.jsonl holds every step's learner stages and the groups' generation spans on one clock, which
`medvl-engine report` draws as timeline.png."""

from __future__ import annotations

import json
import time

import pytest

from medvl_engine import config as config_lib
from medvl_engine.profiling import StepProfiler, Timeline, stage
from medvl_engine.trainers.config import GRPOConfig, SFTConfig, parse_step_range

LEARNER_STAGES = ["rollout_wait", "collate", "logprobs", "update", "weight_sync"]


@pytest.mark.parametrize("cls", [GRPOConfig, SFTConfig])
@pytest.mark.parametrize("steps, message", [
    ("5-3", "ends before it starts"),
    ("x", "expected steps as A-B or A"),
    ("0-2", "steps count from 1"),
    ("3-", "expected steps as A-B or A"),
])
def test_bad_profile_steps_are_refused_with_the_key_named(cls, steps, message):
    with pytest.raises(ValueError, match=rf"^profile\.steps: .*{message}"):
        config_lib.build(cls, {"profile": {"steps": steps}})


def test_profile_steps_parse_and_must_fall_in_the_run():
    assert parse_step_range("3-5") == (3, 5) and parse_step_range(" 2 ") == (2, 2) and parse_step_range("") is None
    cfg = config_lib.build(GRPOConfig, {"profile": {"steps": "3-5"}, "steps": 4})
    assert cfg.profile.step_range == (3, 5) and cfg.profile.timeline
    with pytest.raises(ValueError, match=r"profile.steps 5-6: the run has 4 steps, none of them would be recorded"):
        config_lib.build(GRPOConfig, {"profile": {"steps": "5-6"}, "steps": 4})
    assert config_lib.build(SFTConfig, {"profile": {"steps": "5-6"}}).profile.step_range == (5, 6)  # epochs decide
    with pytest.raises(ValueError, match=r"profile.steps 5-6: the run stops after max_steps=4"):
        config_lib.build(SFTConfig, {"profile": {"steps": "5-6"}, "max_steps": 4})


def test_a_stage_is_a_range_only_while_a_profiler_records(tmp_path):
    import torch

    profiler = StepProfiler((2, 3), tmp_path, rank=1)
    spans: list = []
    for step in (1, 2, 3, 4):
        profiler.begin(step)
        with stage("update", spans):
            torch.ones(4).sum()
        profiler.end(step)
    assert profiler.written == tmp_path / "trace-rank1.json"
    events = json.loads(profiler.written.read_text())["traceEvents"]
    # Steps 2 and 3 were recorded, 1 and 4 were not.
    assert sum(e.get("name") == "medvl/update" for e in events) == 2
    assert [name for name, _, _ in spans] == ["update"] * 4
    assert all(start <= end for _, start, end in spans)


def test_a_resumed_timeline_keeps_its_steps_and_continues_the_clock(tmp_path):
    with Timeline(tmp_path, 0) as timeline:
        origin = timeline.origin
        for step in (1, 2, 3):
            timeline.write(step, "learner", [("update", origin + step, origin + step + 0.5)])
    with Timeline(tmp_path, 0, resume_step=2) as timeline:
        now = time.time()
        timeline.write(3, "learner", [("update", now, now + 1.0)])
    rows = [json.loads(line) for line in (tmp_path / "timeline.jsonl").read_text().splitlines()]
    assert [(r["step"], r["start"], r["end"]) for r in rows[:2]] == [(1, 1.0, 1.5), (2, 2.0, 2.5)]
    # Step 3 was redone after the resume: its clock goes on from where step 2 ended.
    assert len(rows) == 3 and rows[2]["step"] == 3 and 2.5 <= rows[2]["start"] < 3.0
    assert rows[2]["end"] == pytest.approx(rows[2]["start"] + 1.0)
    with Timeline(tmp_path / "other", 1) as timeline:  # only rank 0 writes
        timeline.write(1, "learner", [("update", 0.0, 1.0)])
    assert not (tmp_path / "other" / "timeline.jsonl").exists()


@pytest.mark.slow
def test_a_profiled_grpo_run_writes_a_trace_and_its_timeline(toy_model, tmp_path):
    from test_grpo import run_toy, toy_config

    from medvl_engine.cli import main as cli

    run_dir = tmp_path / "run"
    cfg = toy_config(toy_model, run_dir, kl_coef=0.01)
    cfg.profile.steps = "2-2"
    history, _ = run_toy(cfg)
    assert [row["step"] for row in history] == [1, 2, 3]

    trace = json.loads((run_dir / "profile" / "trace-rank0.json").read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    for name in ("grpo_step", "rollout_wait", "generate", "score", "old_logprobs", "ref_logprobs", "forward", "loss",
                 "backward", "optimizer_step", "weight_sync", "weight_sync/gather", "weight_sync/load"):
        assert f"medvl/{name}" in names, name
    assert names.count("medvl/grpo_step") == 1  # step 2 only
    # 4 prompts x 16 answers in 2 mini-batches, each 4 micro-batches of 8: one backward per micro-batch.
    assert names.count("medvl/backward") == names.count("medvl/optimizer_step") == 8

    rows = [json.loads(line) for line in (run_dir / "timeline.jsonl").read_text().splitlines()]
    assert all(set(r) == {"step", "who", "stage", "start", "end"} and 0 <= r["start"] <= r["end"] for r in rows)
    learner = [r for r in rows if r["who"] == "learner"]
    assert [(r["step"], r["stage"]) for r in learner] == [(s, name) for s in (1, 2, 3) for name in LEARNER_STAGES]
    # One clock: the learner's stages follow each other, step after step.
    assert all(a["end"] <= b["start"] for a, b in zip(learner, learner[1:]))
    generated = [r for r in rows if r["who"] != "learner"]
    # Colocated: the pool in this process generated each step's 4 groups (staleness 0: none ahead).
    assert {r["who"] for r in generated} == {"rollout-local"}
    assert [sum(r["step"] == s for r in generated) for s in (1, 2, 3)] == [4, 4, 4]
    for step in (1, 2, 3):
        wait = next(r for r in learner if r["step"] == step and r["stage"] == "rollout_wait")
        # Colocated generation runs while the learner waits for it, not while it trains.
        assert all(wait["start"] <= r["start"] <= r["end"] <= wait["end"] + 1e-3 for r in generated
                   if r["step"] == step)

    assert cli(["report", str(run_dir)]) == 0
    png = (run_dir / "timeline.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
