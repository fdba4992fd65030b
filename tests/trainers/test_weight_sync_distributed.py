"""`transport.weight_sync distributed` end to end on the CPU: the learner (this process) and one rollout
worker process with the hf backend form a gloo group; after every step the learner announces the
version with its buckets over ZeroMQ, broadcasts them, and waits for the worker's `WeightsLoaded`."""

from __future__ import annotations

import json
import re

import pytest
import torch

from medvl_engine import config as config_lib
from medvl_engine.trainers.config import GRPOConfig


def distributed_config(model, run_dir, endpoint: str, steps: int) -> GRPOConfig:
    return config_lib.build(GRPOConfig, {
        "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 1e-2},
        "data": {"source": "bundled", "text_only": True, "shuffle": False, "max_samples": 8},
        # max_staleness 0: step s trains only on answers of version s - 1, the weights pushed after step s - 1.
        "rollout": {"n": 4, "max_response_tokens": 8, "seed": 1, "max_staleness": 0},
        "transport": {"endpoint": endpoint, "workers": 1, "weight_sync": "distributed"},
        # The tiny model scores 0 on everything (no advantage): the entropy bonus moves the weights every step.
        "algo": {"prompts_per_step": 2, "mini_batches": 1, "kl_coef": 0.0, "entropy_coef": 0.1},
        "deepspeed": {"micro_batch_size": 4},
        "output": str(run_dir),
        "checkpoint": {"export": False, "final": True},
        "steps": steps,
    })


def engine_vs_model_logp(model, groups, temperature: float) -> float:
    """Largest |engine log-prob - `model`'s| over the groups' answer tokens."""
    worst = 0.0
    for g in groups:
        prompt = g.prompt_array().tolist()
        for i in range(g.n):
            answer = g.response_array(i).tolist()
            ids = torch.tensor([prompt + answer])
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
            logp = torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(answer)[:, None])[:, 0]
            worst = max(worst, float((logp - torch.from_numpy(g.logprob_array(i).copy())).abs().max()))
    return worst


@pytest.mark.slow
def test_weights_reach_a_worker_over_gloo_every_step_and_after_a_resume(tiny_chat_model, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from medvl_engine.trainers import grpo, weight_sync

    # Buckets of ~20 KB: the tiny model's weights go in several buckets (sync_bucket_mb counts whole MB).
    make_sync = weight_sync.make_sync

    def small_buckets(*args, **kwargs):
        sync = make_sync(*args, **kwargs)
        sync.bucket_bytes = 20_000
        return sync

    monkeypatch.setattr(weight_sync, "make_sync", small_buckets)
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).eval()
    run_dir, endpoint = tmp_path / "run", f"ipc://{tmp_path}/groups.sock"
    seen = []

    def on_step(trainer, row):
        buckets = len(weight_sync.bucket_plan(trainer.learner, trainer.sync.bucket_bytes))
        seen.append((row["step"], buckets, engine_vs_model_logp(base, trainer.last_groups, 1.0)))

    # Two steps, then a resumed run (a new worker gets the restored v2 over the group first) for a third.
    rows = grpo.run(distributed_config(tiny_chat_model, run_dir, endpoint, 2), on_step=on_step)
    rows += grpo.run(distributed_config(tiny_chat_model, run_dir, endpoint, 3), resume=True, on_step=on_step)

    assert [r["version"] for r in rows] == [1, 2, 3]
    # The engine's log-probs equal the learner's recomputed ones: the worker ran the learner's weights.
    assert all(r["logp_diff_max"] < 1e-4 for r in rows), [r["logp_diff_max"] for r in rows]
    assert all(r["sync_s"] > 0 for r in rows)
    # ... and from step 2 on those weights are not the initial ones: the base model's log-probs of the
    # same answers are far off (step 1's answers came from it: equal; measured 5e-7, then 0.18, 0.29).
    assert seen[0][2] < 1e-4 and all(diff > 1e-2 for _, _, diff in seen[1:]), seen
    assert all(buckets > 1 for _, buckets, _ in seen), seen
    answers = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert {a["step"] for a in answers} == {1, 2, 3}
    assert all(a["version"] == a["step"] - 1 for a in answers), [(a["step"], a["version"]) for a in answers]
    log = (run_dir / "rollout-0.log").read_text()  # both workers' logs, appended
    assert [int(v) for v in re.findall(r"weights v(\d+) received", log)] == [1, 2, 2, 3], log[-3000:]
    assert "loading weights" not in log and not (run_dir / "weights").exists()
    worker = config_lib.load(_worker_config(), run_dir / "rollout-0.yaml")
    assert worker.sync_rank == 1 and worker.sync_world_size == 2 and worker.sync_backend == "gloo"


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_the_announced_plan_is_the_buckets_the_learner_gathers(toy_model, zero_stage):
    from test_weight_sync import build_learner

    from medvl_engine.trainers.weight_sync import bucket_plan

    learner = build_learner(toy_model, zero_stage)
    plan = bucket_plan(learner, 4096)
    gathered = list(learner.full_parameters(4096))
    assert len(plan) == len(gathered) > 1
    for announced, bucket in zip(plan, gathered):
        assert announced.names == [n for n, _ in bucket]
        assert announced.shapes == [list(t.shape) for _, t in bucket]  # full shapes under ZeRO-3 too
        assert announced.dtypes == ["float32"] * len(bucket)


def _worker_config():
    from medvl_engine.rollout.worker import WorkerConfig

    return WorkerConfig
