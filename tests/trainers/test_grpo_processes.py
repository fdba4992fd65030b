"""GRPO end to end across processes: 2 DeepSpeed learner ranks (gloo) launched by torchrun, a rollout
worker in its own process with the hf backend, ZeroMQ in between, new weights announced through disk;
at ZeRO-1 and at the recipes' ZeRO-3 (parameters sharded across the ranks: every weight push and the
export gather them), whose Hugging Face export must reload with the logits of the final weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from medvl_engine.trainers.distributed import free_port


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 3])
def test_two_learner_ranks_train_on_a_worker_stream(tiny_chat_model, tmp_path, zero_stage):
    run_dir = tmp_path / "run"
    endpoint = f"ipc://{tmp_path}/groups.sock"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "medvl_engine.cli", "grpo",
               "--model.path", str(tiny_chat_model), "--model.dtype", "fp32", "--no-model.gradient-checkpointing",
               "--data.text-only", "--transport.endpoint", endpoint, "--transport.workers", "1",
               "--rollout.n", "4", "--rollout.max-response-tokens", "12", "--transport.weight-sync", "disk",
               "--algo.prompts-per-step", "2", "--algo.mini-batches", "1", "--deepspeed.micro-batch-size", "2",
               "--optim.lr", "1e-3", "--steps", "2", "--checkpoint.every", "2",
               "--deepspeed.zero-stage", str(zero_stage),
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
    assert_export_is_the_final_policy(run_dir / "export", run_dir / "checkpoints", "step_000002", tiny_chat_model)


def assert_export_is_the_final_policy(export, checkpoints, tag, initial):
    """`export` reloads with the logits of the weights DeepSpeed itself rebuilds from the final checkpoint's
    per-rank shards (`zero_to_fp32`: an oracle apart from the learner's gathering, which wrote the export)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints), tag=tag)
    reference = AutoModelForCausalLM.from_pretrained(initial, dtype=torch.float32).eval()
    before = {name: tensor.clone() for name, tensor in reference.state_dict().items()}
    missing, unexpected = reference.load_state_dict(final, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied to the embedding
    assert any(not torch.equal(before[name], tensor) for name, tensor in reference.state_dict().items()), \
        "the two steps changed the weights"
    reloaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = torch.tensor([tokenizer.apply_chat_template([{"role": "user", "content": "Which option is right?"}],
                                                      add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)
