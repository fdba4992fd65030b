"""Worker faults lose nothing: split placement, 2 rollout workers the learner starts, staleness 0, a tiny fp32
model. A worker killed with SIGKILL mid-step, a worker stopped with SIGSTOP (its heartbeats stop: the learner
kills it after transport.liveness_timeout_s and restarts it), a worker whose engine raises on every request
(it exits at the first prompt that fails after its retries, unsent, and its restart regenerates it): each run
finishes all its steps and its rollouts.jsonl equals the run without faults (position, seed, tokens, reward).
A worker that keeps failing stops the run with a message naming it.

(Once the engine's failures went to the learner as RolloutErrors, and those positions were lost.)"""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

import pytest

from medvl_engine import config as config_lib
from medvl_engine.rollout.launcher import WorkerDied
from medvl_engine.trainers.config import GRPOConfig

STEPS, PROMPTS, N = 3, 4, 3
BROKEN_ENGINE_WORKER = Path(__file__).with_name("broken_engine_worker.py")

pytestmark = pytest.mark.slow


def fault_config(model, run_dir: Path, **transport) -> GRPOConfig:
    return config_lib.build(GRPOConfig, {
        "model": {"path": str(model), "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 1e-2},
        "data": {"source": "bundled", "text_only": True, "shuffle": False},
        "rollout": {"n": N, "max_response_tokens": 8, "seed": 11, "max_staleness": 0, "max_batch": 16},
        "transport": {"endpoint": f"ipc://{run_dir}.sock", "workers": 2, "liveness_timeout_s": 3.0,
                      "max_restarts": 2, **transport},
        "algo": {"prompts_per_step": PROMPTS, "mini_batches": 1, "kl_coef": 0.0},
        "deepspeed": {"micro_batch_size": N},
        "output": str(run_dir),
        "checkpoint": {"every": 0, "final": False, "export": False},
        "steps": STEPS, "seed": 1,
    })


def train(cfg: GRPOConfig, fault=None):
    """Train with the learner's own workers; `fault(feed)` changes them before they start."""
    from medvl_engine.trainers import grpo
    from medvl_engine.trainers.placement import build_transport_feed

    feed = build_transport_feed(cfg, None)
    if fault is not None:
        fault(feed)
    try:
        return grpo.run(cfg, feed=feed), feed
    finally:
        for worker in feed.workers:  # a stopped process the run did not get to
            if worker.pid is not None:
                for sig in (signal.SIGCONT, signal.SIGKILL):
                    try:
                        os.kill(worker.pid, sig)
                    except ProcessLookupError:
                        break


def rollouts(run_dir: Path) -> list:
    from medvl_engine.trainers.metrics import read_rollouts

    return read_rollouts(run_dir / "rollouts.jsonl")


def after_messages(count: int, action):
    """A fault: `action(feed)` once the learner has received `count` messages (the first of step 2 at 5)."""
    def install(feed):
        inner, seen = feed.recv, [0]

        def recv(timeout=None):
            msg = inner(timeout=timeout)
            seen[0] += 1
            if seen[0] == count:
                action(feed)
            return msg

        feed.recv = recv
    return install


def broken_engine(worker, when: str) -> None:
    """Run `worker` through the test double whose engine raises (see broken_engine_worker.py)."""
    assert worker.argv[1:3] == ["-m", "medvl_engine.cli"], worker.argv
    worker.argv = [sys.executable, str(BROKEN_ENGINE_WORKER)] + worker.argv[3:]
    worker.env = {**(worker.env or {}), "MEDVL_TEST_BROKEN_ENGINE": when}


@pytest.fixture(scope="module")
def quiet(tiny_chat_model, tmp_path_factory):
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 workers and the learner share 2 cores
    run_dir = tmp_path_factory.mktemp("faults") / "quiet"
    history, feed = train(fault_config(tiny_chat_model, run_dir))
    assert len(history) == STEPS and all(w.restarts == 0 for w in feed.workers)
    records = rollouts(run_dir)
    assert len(records) == STEPS * PROMPTS * N and {r.position for r in records} == set(range(STEPS * PROMPTS))
    return records


def test_a_killed_and_a_stopped_worker_lose_nothing(quiet, tiny_chat_model, tmp_path):
    def kill_one_stop_the_other(feed):
        os.kill(feed.workers[0].pid, signal.SIGKILL)
        os.kill(feed.workers[1].pid, signal.SIGSTOP)

    history, feed = train(fault_config(tiny_chat_model, tmp_path / "run"), after_messages(5, kill_one_stop_the_other))
    assert len(history) == STEPS
    assert [w.restarts for w in feed.workers] == [1, 1] and feed.liveness_kills == 1
    assert feed.workers[0].exit_codes == [-signal.SIGKILL] and feed.workers[1].exit_codes == [-signal.SIGKILL]
    assert rollouts(tmp_path / "run") == quiet


def test_a_worker_whose_engine_fails_is_restarted_and_regenerates(quiet, tiny_chat_model, tmp_path):
    marker = tmp_path / "engine-failed-once"
    history, feed = train(fault_config(tiny_chat_model, tmp_path / "run"),
                          lambda feed: broken_engine(feed.workers[1], f"once:{marker}"))
    assert len(history) == STEPS and marker.exists()
    assert feed.workers[1].exit_codes == [70] and feed.workers[0].restarts == 0
    # Its first prompt to fail is one of its positions of step 1 (1 or 3: both are in flight at once).
    assert re.search(r"the engine failed the prompt at stream position [13] .*injected engine fault",
                     feed.workers[1].log_path.read_text())
    assert all(row["rollout_errors"] == 0 for row in history)
    assert rollouts(tmp_path / "run") == quiet


def test_a_worker_that_keeps_failing_stops_the_run_naming_it(tiny_chat_model, tmp_path):
    with pytest.raises(WorkerDied, match=r"rollout-1 exited with code 70 after 2 restart\(s\)") as error:
        train(fault_config(tiny_chat_model, tmp_path / "run"), lambda feed: broken_engine(feed.workers[1], "always"))
    assert "injected engine fault" in str(error.value)
