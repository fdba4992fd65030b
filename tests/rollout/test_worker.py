"""The rollout-worker command end to end: real worker processes (supervised by WorkerProcess) generating
with a tiny random model, streaming to a GroupReceiver in this process over ipc://, loading announced
weights from disk, and resuming exactly where the learner stands after being killed. And, in-process,
that a worker restarted at position k regenerates the groups the uninterrupted run had there.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from tiny_models import byte_tokenizer, tiny_llama

from medvl_engine.data import load_bundled
from medvl_engine.prompts import render_prompt
from medvl_engine.rollout.config import RolloutConfig
from medvl_engine.rollout.hf_backend import HFBackend
from medvl_engine.rollout.launcher import WorkerDied, WorkerProcess
from medvl_engine.rollout.stream import PromptStream
from medvl_engine.rollout.types import derive_seed
from medvl_engine.rollout.worker import EXIT_LEARNER_GONE, RolloutWorker
from medvl_engine.transport.messages import RolloutGroup, WeightVersion
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender


@pytest.fixture(scope="module")
def policy_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("policies")
    tokenizer = byte_tokenizer()
    for name, seed in (("v0", 1), ("v1", 2)):
        tiny_llama(tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return root


def worker_args(policy, endpoint, *, max_prompts: int) -> list[str]:
    return ["--rollout.backend", "hf", "--model", str(policy), "--data.source", "bundled", "--data.text-only",
            "--no-data.shuffle", "--connect", endpoint, "--producer-id", "w0", "--rollout.n", "3",
            "--rollout.max-response-tokens", "6", "--max-prompts", str(max_prompts), "--rollout.max-in-flight", "2",
            "--rollout.max-batch", "6", "--handshake-timeout-s", "60"]


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
    receiver = GroupReceiver(f"ipc://{tmp_path}/rollout.sock", credits=2, insecure=True)
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
        stream = PromptStream(text_samples, tokenizer, shuffle_seed=None, sample_seed=0)
        for position, m in enumerate(messages):
            sample = stream.sample_at(position)
            assert m.prompt_id == f"{sample.dataset_name}/{sample.dataset_index}@{position}"
            assert (m.position, m.seed) == (position, derive_seed(0, position))
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


def wait_exit(worker: WorkerProcess, timeout: float) -> int:
    """The worker's exit code (no restart), within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while worker._process.poll() is None:
        assert time.monotonic() < deadline, f"still running after {timeout} s:\n{worker.log_tail()}"
        time.sleep(0.1)
    return worker._process.returncode


@pytest.mark.slow
def test_a_worker_started_by_hand_exits_when_its_learner_finishes(policy_dirs, tmp_path):
    """(Once a worker beside a finished `grpo --transport.workers 0` kept running until killed.)"""
    receiver = GroupReceiver(f"ipc://{tmp_path}/rollout.sock", credits=2, shards={"w0": (0, 1)}, strict=True)
    try:
        worker = WorkerProcess(worker_args(policy_dirs / "v0", receiver.endpoint, max_prompts=0), max_restarts=0,
                               log_path=tmp_path / "worker.log")
        worker.start()
        receive(receiver, 2, worker)
    finally:
        receiver.close("the learner reached its last step")
    assert wait_exit(worker, 30) == 0
    assert "w0: the learner reached its last step; exiting" in worker.log_tail()


LEARNER_STAND_IN = """
import sys, time
from medvl_engine.transport.receiver import GroupReceiver
receiver = GroupReceiver(sys.argv[1], credits=2, strict=True)
receiver.recv(timeout=120)
print("got one", flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_a_worker_started_by_hand_exits_when_its_learner_dies(policy_dirs, tmp_path):
    endpoint = f"ipc://{tmp_path}/rollout.sock"
    learner = subprocess.Popen([sys.executable, "-c", LEARNER_STAND_IN, endpoint], stdout=subprocess.PIPE, text=True)
    try:
        worker = WorkerProcess(worker_args(policy_dirs / "v0", endpoint, max_prompts=0) + ["--learner-timeout-s", "2"],
                               max_restarts=0, log_path=tmp_path / "worker.log")
        worker.start()
        assert learner.stdout.readline().strip() == "got one", worker.log_tail()
        learner.kill()  # SIGKILL: no Stop, the connection just goes down
        started = time.monotonic()
        assert wait_exit(worker, 30) == EXIT_LEARNER_GONE
        assert time.monotonic() - started < 15
        assert "has been unreachable for" in worker.log_tail()
    finally:
        learner.kill()
        learner.wait()
        worker.stop()


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


def stream_from(position: int, stop: int, endpoint: str, model, tokenizer, samples, *, seed: int,
                max_in_flight: int, max_batch: int) -> list:
    """Run a RolloutWorker whose learner stands at `position` (a receiver thread plays the learner)."""
    receiver = GroupReceiver(endpoint, credits=4, start_seqs={"w0": position}, insecure=True)
    messages: list = []

    def learner():
        try:
            while len(messages) < stop - position:
                messages.append(receiver.recv(timeout=60))
        finally:
            receiver.close()  # by the thread that reads it: a ZeroMQ socket is never used from two threads

    thread = threading.Thread(target=learner)
    thread.start()
    sender = GroupSender(receiver.endpoint, "w0", insecure=True)
    try:
        rollout = RolloutConfig(n=3, temperature=1.0, max_response_tokens=8, max_in_flight=max_in_flight)
        stream = PromptStream(samples, tokenizer, shuffle_seed=None, sample_seed=seed, stop=stop)
        worker = RolloutWorker(HFBackend(model, tokenizer, max_batch=max_batch), sender, stream, rollout,
                               handshake_timeout_s=30)
        assert asyncio.run(asyncio.wait_for(worker.run(), 120)) == stop - position
    finally:
        thread.join(60)
        sender.close(linger_s=0)
    assert [m.seq for m in messages] == list(range(position, stop))
    return messages


def test_a_worker_restarted_at_position_k_regenerates_the_same_groups(tmp_path):
    tokenizer = byte_tokenizer()
    model = tiny_llama(tokenizer, seed=3)
    samples = [s for s in load_bundled() if not s.images][:4]  # 6 positions wrap: epoch 1 repeats prompts
    full = stream_from(0, 6, f"ipc://{tmp_path}/a.sock", model, tokenizer, samples, seed=5, max_in_flight=2,
                       max_batch=6)
    # Resumed at 3, with other batches (one generate call holds up to 3 groups instead of 2).
    resumed = stream_from(3, 6, f"ipc://{tmp_path}/b.sock", model, tokenizer, samples, seed=5, max_in_flight=3,
                          max_batch=9)
    reseeded = stream_from(3, 6, f"ipc://{tmp_path}/c.sock", model, tokenizer, samples, seed=6, max_in_flight=3,
                           max_batch=9)
    for before, after, other in zip(full[3:], resumed, reseeded):
        assert before.prompt_id == after.prompt_id
        for k in range(before.n):
            assert before.response_array(k).tolist() == after.response_array(k).tolist()
            # The same draws; only the float rounding of a differently shaped batch differs.
            np.testing.assert_allclose(before.logprob_array(k), after.logprob_array(k), atol=1e-5)
        assert before.texts == after.texts and before.reward_array().tolist() == after.reward_array().tolist()
        assert [other.response_array(k).tolist() for k in range(3)] != [before.response_array(k).tolist()
                                                                       for k in range(3)]
    # Position 4 asks sample 0 again (epoch 1): a new seed, so not the answers of position 0.
    assert [full[4].response_array(k).tolist() for k in range(3)] != [full[0].response_array(k).tolist()
                                                                      for k in range(3)]


def test_data_parallel_shards_split_each_epoch_without_overlap():
    samples = [SimpleNamespace(index=i) for i in range(10)]
    renderer = None  # positions only: no request is built
    whole = PromptStream(samples, renderer, shuffle_seed=3, sample_seed=0)
    shards = [PromptStream(samples, renderer, shuffle_seed=3, sample_seed=0, shard=i, num_shards=3) for i in range(3)]
    # Shard i owns positions i, i + 3, ...: 3 shards cover every position once, each with the whole stream's
    # sample and seed for that position.
    owned = {i: [p for p in range(21) if shards[i].first_position(p) == p] for i in range(3)}
    assert sorted(p for ps in owned.values() for p in ps) == list(range(21))
    for i, positions in owned.items():
        assert positions == list(range(i, 21, 3))
        assert all(shards[i].sample_at(p) is whole.sample_at(p) and shards[i].seed_at(p) == whole.seed_at(p)
                   for p in positions)
    assert sorted(whole.sample_at(p).index for p in range(10)) == list(range(10))  # an epoch: each once
    assert [whole.sample_at(p).index for p in range(10)] != list(range(10))  # shuffled
    assert [whole.sample_at(p).index for p in range(10, 20)] != [whole.sample_at(p).index for p in range(10)]
    in_order = PromptStream(samples, renderer, shuffle_seed=None, sample_seed=None)
    assert [in_order.sample_at(p).index for p in range(12)] == [*range(10), 0, 1] and in_order.seed_at(5) is None
    # A worker resumed at position 4 continues with its own next position.
    assert shards[1].first_position(4) == 4 and shards[2].first_position(4) == 5 and shards[0].first_position(4) == 6
    with pytest.raises(ValueError, match="shard 3"):
        PromptStream(samples, renderer, shuffle_seed=None, sample_seed=None, shard=3, num_shards=3)
