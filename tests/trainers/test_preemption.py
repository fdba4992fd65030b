"""Preemption: SIGTERM (a scheduler) and SIGINT (Ctrl-C) stop `medvl-engine grpo` and `sft` after the step in
flight, with a checkpoint of it, one line on stderr saying where and how to continue, and exit code 143 / 130;
`--resume` then ends where an uninterrupted run ends, log for log. A second signal exits at once, and the rollout
worker a split learner started goes down with it either way.

The runs are the command line in subprocesses on the tiny chat model (~10-15 s each on 2 cores, mostly start-up);
their steps take ~0.1 s, so a run of 30 is still going when the signal follows the third step's log line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from medvl_engine.trainers.preemption import StopAfterStep

# What differs between two identical runs: wall-clock times.
TIMING = {"tokens_per_s", "rollout_wait_s", "train_s", "sync_s", "seconds"}
STEPS = 30
COMMON = ["--model.dtype", "fp32", "--no-model.gradient-checkpointing", "--data.text-only", "--no-checkpoint.export",
          "--checkpoint.every", "10"]
# Staleness 0: each step samples with the weights of the step before, whatever the timing.
GRPO = ["--rollout.n", "2", "--rollout.max-response-tokens", "8", "--rollout.max-staleness", "0",
        "--algo.prompts-per-step", "2", "--algo.mini-batches", "1", "--deepspeed.micro-batch-size", "4",
        "--optim.lr", "1e-3", "--steps", str(STEPS)]
# 6 text-only questions, 2 a step: 3 steps an epoch.
SFT = ["--deepspeed.micro-batch-size", "1", "--global-batch-size", "2", "--epochs", str(STEPS // 3)]
ENV = dict(os.environ, OMP_NUM_THREADS="1", MEDVL_PROGRESS="log")

# The learner with one slow step (the 3rd sleeps a minute before it returns): a second signal surely lands
# while a step is in flight.
SLOW_THIRD_STEP = textwrap.dedent("""
    import sys, time
    from medvl_engine.cli import main
    from medvl_engine.trainers import grpo

    step = grpo.GRPOTrainer.step

    def slow_step(self):
        row = step(self)
        if self.step_index == 3:
            time.sleep(60)
        return row

    grpo.GRPOTrainer.step = slow_step
    sys.argv = ["medvl-engine", *sys.argv[1:]]
    sys.exit(main())
""")


def start(command: str, model: Path, run_dir: Path, *args: str, script: str | None = None) -> subprocess.Popen:
    """`medvl-engine COMMAND` in a process of its own; stdout and stderr go to files beside the run folder."""
    how = ["-c", script] if script else ["-m", "medvl_engine.cli"]
    argv = [sys.executable, *how, command, "--model.path", str(model), *COMMON, *(GRPO if command == "grpo" else SFT),
            "--output", str(run_dir), *args]
    with open(f"{run_dir}.out", "w") as out, open(f"{run_dir}.err", "w") as err:
        # SIGINT as at a terminal: a background job of a non-interactive shell would inherit it ignored.
        return subprocess.Popen(argv, stdout=out, stderr=err, env=ENV,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(process: subprocess.Popen, run_dir: Path, timeout: float = 180) -> tuple[int, str]:
    """The exit code and stderr of a run `start`ed."""
    return process.wait(timeout), Path(f"{run_dir}.err").read_text()


def run(command: str, model: Path, run_dir: Path) -> None:
    code, err = finish(start(command, model, run_dir), run_dir)
    assert code == 0, err[-3000:]


def resume(command: str, run_dir: Path) -> None:
    """The command the stop message gives."""
    done = subprocess.run([sys.executable, "-m", "medvl_engine.cli", command, "--config", f"{run_dir}/config.yaml",
                           "--resume"], capture_output=True, text=True, timeout=180, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def step_logs(run_dir: Path) -> tuple[list[dict], str]:
    """The per-step logs without their timings: the metrics rows and rollouts.jsonl."""
    rollouts = run_dir / "rollouts.jsonl"
    return ([{k: v for k, v in row.items() if k not in TIMING} for row in rows(run_dir)],
            rollouts.read_text() if rollouts.is_file() else "")


def wait_for(process: subprocess.Popen, done, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert process.poll() is None, f"exited with {process.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout} s"
        time.sleep(0.02)


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int) -> None:
    wait_for(process, lambda: len(rows(run_dir)) >= step, f"step {step}")


def assert_stopped_with_checkpoint(command: str, code: int, err: str, run_dir: Path, signum: int) -> None:
    """The exit code, the last line on stderr, and a checkpoint of the last step logged."""
    assert code == 128 + signum, err[-3000:]
    assert "Traceback" not in err
    reached = rows(run_dir)[-1]["step"]
    assert 3 <= reached < STEPS
    tag = run_dir / "checkpoints" / f"step_{reached:06d}"
    assert err.strip().splitlines()[-1] == (
        f"medvl-engine {command}: stopped by {signal.Signals(signum).name} after step {reached} of {STEPS}, "
        f"checkpoint {tag}; to continue, run the same command with --resume "
        f"(e.g. medvl-engine {command} --config {run_dir}/config.yaml --resume)")
    assert (tag / "client_state.pt").is_file()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == tag.name


def rollout_worker(learner: subprocess.Popen):
    import psutil

    found = [p for p in psutil.Process(learner.pid).children() if "rollout-worker" in p.cmdline()]
    assert len(found) == 1, found
    return found[0]


def gone(process) -> bool:
    import psutil

    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- the command line ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grpo_uninterrupted(tiny_chat_model, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("grpo-uninterrupted") / "run"
    run("grpo", tiny_chat_model, run_dir)
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_grpo_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tiny_chat_model, grpo_uninterrupted,
                                                                         tmp_path, signum):
    run_dir = tmp_path / "run"
    process = start("grpo", tiny_chat_model, run_dir)
    wait_for_step(process, run_dir, 3)
    process.send_signal(signum)
    assert_stopped_with_checkpoint("grpo", *finish(process, run_dir), run_dir, signum)

    resume("grpo", run_dir)
    assert step_logs(run_dir) == step_logs(grpo_uninterrupted)


@pytest.mark.slow
def test_sft_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tiny_chat_model, tmp_path):
    uninterrupted, run_dir = tmp_path / "uninterrupted", tmp_path / "run"
    run("sft", tiny_chat_model, uninterrupted)
    process = start("sft", tiny_chat_model, run_dir)
    wait_for_step(process, run_dir, 3)
    process.send_signal(signal.SIGTERM)
    assert_stopped_with_checkpoint("sft", *finish(process, run_dir), run_dir, signal.SIGTERM)

    resume("sft", run_dir)
    assert step_logs(run_dir) == step_logs(uninterrupted)


def split(tmp_path: Path) -> tuple[str, ...]:
    return "--transport.endpoint", f"ipc://{tmp_path}/groups.sock", "--transport.workers", "1"


@pytest.fixture(scope="module")
def split_uninterrupted(tiny_chat_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("split-uninterrupted")
    run_dir = folder / "run"
    code, err = finish(start("grpo", tiny_chat_model, run_dir, *split(folder)), run_dir)
    assert code == 0, err[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_split_learner_stops_its_rollout_worker_when_preempted_and_resumes_exactly(
        tiny_chat_model, split_uninterrupted, tmp_path, signum):
    run_dir = tmp_path / "run"
    process = start("grpo", tiny_chat_model, run_dir, *split(tmp_path))
    wait_for_step(process, run_dir, 3)
    worker = rollout_worker(process)
    process.send_signal(signum)
    assert_stopped_with_checkpoint("grpo", *finish(process, run_dir), run_dir, signum)
    assert gone(worker)

    resume("grpo", run_dir)  # its config names the same endpoint: a new worker resumes the stream where it stood
    assert step_logs(run_dir) == step_logs(split_uninterrupted)


@pytest.mark.slow
def test_a_second_signal_exits_at_once_and_stops_the_rollout_worker(tiny_chat_model, tmp_path):
    run_dir = tmp_path / "run"
    process = start("grpo", tiny_chat_model, run_dir, "--transport.endpoint", f"ipc://{tmp_path}/groups.sock",
                    "--transport.workers", "1", script=SLOW_THIRD_STEP)
    wait_for_step(process, run_dir, 2)  # the third step, a minute long, is in flight
    worker = rollout_worker(process)
    process.send_signal(signal.SIGTERM)
    wait_for(process, lambda: "SIGTERM again stops at once" in Path(f"{run_dir}.err").read_text(), "first signal")
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    code, err = finish(process, run_dir, timeout=30)
    assert time.monotonic() - sent < 10  # the step had a minute to go
    assert code == 143, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"medvl-engine grpo: second SIGTERM: stopped at once, the step in flight is lost; run the same command with "
        f"--resume to continue from the last checkpoint in {run_dir}/checkpoints")
    assert len(rows(run_dir)) == 2
    assert gone(worker)


# -- the helper ---------------------------------------------------------------------------------------------


def test_a_signal_sets_the_flag_and_the_previous_handlers_come_back(tmp_path):
    def previous(signum, frame):
        raise AssertionError("the previous handler ran")

    before = signal.signal(signal.SIGTERM, previous)
    sigint = signal.getsignal(signal.SIGINT)
    try:
        with StopAfterStep("grpo", tmp_path, announce=False) as stop:
            assert stop.requested() == 0
            signal.raise_signal(signal.SIGTERM)  # the handler runs before this returns
            assert stop.requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is previous
        assert signal.getsignal(signal.SIGINT) is sigint
    finally:
        signal.signal(signal.SIGTERM, before)


def test_no_handler_outside_the_main_thread_nor_over_an_ignored_signal(tmp_path):
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopAfterStep("sft", tmp_path, announce=False):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    finally:
        signal.signal(signal.SIGINT, before)
    handlers = []

    def in_thread():
        with StopAfterStep("sft", tmp_path, announce=False):
            handlers.append(signal.getsignal(signal.SIGTERM))

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert handlers == [signal.getsignal(signal.SIGTERM)]


# Two gloo ranks: only rank 0 gets a signal before the check, and both stop on it.
TWO_RANKS = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed as dist
    from medvl_engine.trainers.preemption import StopAfterStep

    rank = int(sys.argv[1])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[2]}", rank=rank, world_size=2)
    with StopAfterStep("grpo", ".", announce=False) as stop:
        first = stop.requested(2)
        if rank == 0:
            signal.raise_signal(signal.SIGTERM)
        print(first, stop.requested(2))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_ranks_agree_to_stop_when_one_got_the_signal():
    from medvl_engine.trainers.distributed import free_port

    port = str(free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", TWO_RANKS, str(rank), port], stdout=subprocess.PIPE, text=True,
                              env=ENV) for rank in (0, 1)]
    assert [p.communicate(timeout=120)[0].split() for p in ranks] == [["0", str(int(signal.SIGTERM))]] * 2
