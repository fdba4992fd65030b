"""The rollout-worker command end to end: real worker processes (supervised by WorkerProcess) generating
with a tiny random model, streaming to a GroupReceiver in this process over ipc://, loading announced
weights from disk, and resuming exactly where the learner stands after being killed.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
from tiny_models import byte_tokenizer, tiny_llama

from medvl_engine.data import load_bundled
from medvl_engine.prompts import render_prompt
from medvl_engine.rollout.launcher import WorkerDied, WorkerProcess
from medvl_engine.rollout.worker import stream_samples
from medvl_engine.transport.channel import GroupReceiver
from medvl_engine.transport.messages import RolloutGroup, WeightVersion


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    tokenizer = byte_tokenizer()
    for name, seed in (("v0", 1), ("v1", 2)):
        tiny_llama(tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def worker_args(policy, endpoint, *, max_prompts: int) -> list[str]:
    return ["--backend", "hf", "--model", str(policy), "--dataset", "bundled", "--text-only",
            "--connect", endpoint, "--producer-id", "w0", "--n", "3", "--max-new-tokens", "6",
            "--max-prompts", str(max_prompts), "--max-in-flight", "2", "--max-batch", "6",
            "--handshake-timeout-s", "60"]


def receive(receiver, count: int, worker: WorkerProcess, timeout: float = 120) -> list:
    """`count` messages, watching the worker meanwhile: a dead worker fails the test with its log, not a timeout."""
    messages, deadline = [], time.monotonic() + timeout
    while len(messages) < count:
        try:
            messages.append(receiver.recv(timeout=0.5))
        except TimeoutError:
            assert time.monotonic() < deadline, f"no message in {timeout} s; worker log:\n{worker.log_tail()}"
            worker.poll()  # restarts a killed worker, raises WorkerDied with the log when it cannot
    return messages


@pytest.mark.slow
def test_worker_streams_groups_applies_weights_and_resumes_after_a_kill(policy_dirs, tmp_path):
    text_samples = [s for s in load_bundled() if not s.images]
    tokenizer = byte_tokenizer()
    receiver = GroupReceiver(f"ipc://{tmp_path}/rollout.sock", credits=2)
    try:
        with WorkerProcess(worker_args(policy_dirs / "v0", receiver.endpoint, max_prompts=8), max_restarts=0,
                           log_path=tmp_path / "run1.log") as worker:
            worker.start()
            first = receive(receiver, 3, worker)
            receiver.announce(WeightVersion(version=1, path=str(policy_dirs / "v1")))
            rest = receive(receiver, 5, worker)
            assert worker.wait(timeout=120) == 0, worker.log_tail()
        messages = first + rest
        assert [m.seq for m in messages] == list(range(8))
        assert all(isinstance(m, RolloutGroup) and m.n == 3 and m.producer == "w0" for m in messages)
        for m, (position, sample) in zip(messages, stream_samples(text_samples, 0, 8, None)):
            assert m.prompt_id == f"{sample.dataset_name}/{sample.dataset_index}@{position}"
            assert m.dataset_index == sample.dataset_index and m.answer_label == sample.answer_label
            prompt = tokenizer(render_prompt(tokenizer, sample), add_special_tokens=False)["input_ids"]
            assert m.prompt_array().tolist() == prompt
            for k in range(m.n):
                assert m.logprob_array(k).shape == m.response_array(k).shape and m.response_array(k).size >= 1
                assert np.all(m.logprob_array(k) <= 0)
        # Random answers never pass the format gate: reward 0, and the reward/correct/format arrays came along.
        assert all(m.reward_array().tolist() == [0.0] * 3 and not m.format_array().any() for m in messages)
        versions = [m.weight_version for m in messages]
        assert versions[:3] == [0, 0, 0] and versions[-1] == 1, versions

        # Kill a second run mid-stream: the supervisor restarts it, it asks where the learner stands and
        # the stream continues with no position lost or delivered twice.
        with WorkerProcess(worker_args(policy_dirs / "v0", receiver.endpoint, max_prompts=14), max_restarts=1,
                           restart_delay_s=0.0, log_path=tmp_path / "run2.log") as worker:
            worker.start()
            resumed = receive(receiver, 2, worker)
            worker.kill()
            resumed += receive(receiver, 4, worker)
            assert worker.wait(timeout=120) == 0, worker.log_tail()
            assert worker.restarts == 1 and worker.exit_codes == [-9]
        assert [m.seq for m in resumed] == list(range(8, 14))
        assert [m.prompt_id.rsplit("@", 1)[1] for m in resumed] == [str(p) for p in range(8, 14)]
        assert receiver.stats.lost == 0
    finally:
        receiver.close()


def test_worker_process_gives_up_after_bounded_restarts(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('boom: no model here'); sys.exit(3)"]
    worker = WorkerProcess(command=crash, max_restarts=2, restart_delay_s=0.0, log_path=tmp_path / "crash.log")
    worker.start()
    with pytest.raises(WorkerDied, match=r"exited with code 3 after 2 restart\(s\)") as error:
        worker.wait(timeout=30, interval_s=0.05)
    assert "boom: no model here" in str(error.value)
    assert worker.exit_codes == [3, 3, 3]


def test_worker_process_restarts_a_crash_then_finishes(tmp_path):
    marker = tmp_path / "crashed-once"
    script = (f"import pathlib, sys; m = pathlib.Path({str(marker)!r}); "
              "sys.exit(0) if m.exists() else (m.touch(), sys.exit(1))")
    worker = WorkerProcess(command=[sys.executable, "-c", script], max_restarts=1, restart_delay_s=0.0,
                           log_path=tmp_path / "once.log")
    worker.start()
    assert worker.wait(timeout=30, interval_s=0.05) == 0
    assert worker.restarts == 1 and worker.exit_codes == [1]
