"""GRPO end to end across processes: 2 DeepSpeed learner ranks (gloo) launched by torchrun, a rollout
worker in its own process with the hf backend, ZeroMQ in between, new weights announced through disk."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from medvl_engine.trainers.distributed import free_port


@pytest.mark.slow
def test_two_learner_ranks_train_on_a_worker_stream(tiny_chat_model, tmp_path):
    run_dir = tmp_path / "run"
    endpoint = f"ipc://{tmp_path}/groups.sock"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "medvl_engine.cli", "grpo",
               "--model.path", str(tiny_chat_model), "--model.dtype", "fp32", "--no-model.gradient-checkpointing",
               "--data.text-only", "--transport.endpoint", endpoint, "--transport.workers", "1",
               "--rollout.n", "4", "--rollout.max-response-tokens", "12", "--transport.weight-sync", "disk",
               "--algo.prompts-per-step", "2", "--algo.mini-batches", "1", "--deepspeed.micro-batch-size", "2",
               "--optim.lr", "1e-3", "--steps", "2", "--checkpoint.every", "2",
               "--output", str(run_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in rows] == [1, 2]
    assert all(r["groups"] == 2 and r["response_tokens"] > 0 for r in rows)
    # Both ranks stepped on their half of the answers: 8 answers split 4 + 4, 2 micro-batches each.
    assert all(r["logp_diff_max"] < 1e-3 for r in rows)
    # Every answer came from weights at most max_staleness (1) versions behind the step's learner, and
    # the worker loaded only versions the learner announced, in order. Which ones it loaded is timing: a
    # fast learner may announce v2 before the worker reads v1, and step 2 may train on v0's answers.
    answers = [json.loads(line) for line in (run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert {a["step"] for a in answers} == {1, 2}
    assert all(0 <= (a["step"] - 1) - a["version"] <= 1 for a in answers), [(a["step"], a["version"]) for a in answers]
    log = (run_dir / "rollout-0.log").read_text()
    loaded = [int(v) for v in re.findall(r"loading weights v(\d+)", log)]
    assert loaded == sorted(set(loaded)) and set(loaded) <= {1, 2}, log[-2000:]
    assert (run_dir / "weights" / "v000002" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "step_000002" / "client_state.pt").is_file()
    assert (run_dir / "export" / "config.json").is_file()
