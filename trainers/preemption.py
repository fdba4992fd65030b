"""Preemption: SIGTERM (a scheduler: SLURM, Kubernetes, a launcher passing it on) and SIGINT (Ctrl-C) stop a
training run after the step in flight, with a checkpoint, instead of losing every step since the last one.

    with StopAfterStep("grpo", run_dir, announce=rank == 0, abort=stop_workers) as stop:
        while step < steps:
            ...one step, its logs, the periodic checkpoint...
            signum = stop.requested(world_size, device)      # the same answer on every rank
            if signum:
                saved = save_checkpoint(...)
                raise preempted("grpo", signum, run_dir, saved, step, steps, announce=rank == 0)

The first signal only sets a flag, read between steps: the step in flight finishes, so its logs and the
checkpoint agree and a resumed run continues exactly. The ranks of a torch.distributed run all get the signal
from the launcher, not at the same instant: they agree on it with one all_reduce of the flag per step (only
when there are several), so every rank stops after the same step and none is left waiting in a collective.

A second signal exits at once with the same code, after `abort` (stop the rollout worker processes, which
would otherwise outlive the learner): the step in flight is lost, the last checkpoint is whole (DeepSpeed
writes `latest` and we write client_state.pt last, so a save cut short is skipped at resume). Once the handlers
are given back, a third signal gets the previous handler's behaviour (SIG_DFL for SIGTERM: the process ends).

`Preempted` is an `Interrupted` (a KeyboardInterrupt, as Ctrl-C is to any caller of `run`) carrying the exit
code, 128 + the signal: 143 for SIGTERM, 130 for SIGINT; the trainers' `main` prints its line and returns it.

Handlers go in only in the main thread (Python runs them there and refuses `signal.signal` elsewhere), never
over a signal ignored at start (a background job of a non-interactive shell ignores SIGINT: the Ctrl-C typed
at that shell is not meant for it), and the previous ones come back on exit.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from medvl_engine import run_folder
from medvl_engine.errors import Interrupted

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Interrupted):
    """A signal stopped the run after a step, with a checkpoint; the message says where and how to continue."""

    def __init__(self, message: str, signum: int, *, announce: bool = True):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum  # as a shell reports a process the signal ended: 143, 130
        self.announce = announce  # rank 0 says it; the other ranks stop quietly


class StopAfterStep:
    """Turns SIGTERM and SIGINT into a request to stop after the step in flight (see the module docstring);
    `command` and `run_dir` name the run in the lines it prints (when `announce`), `abort` runs before a second
    signal's immediate exit."""

    def __init__(self, command: str, run_dir: str | Path, *, announce: bool = True,
                 abort: Callable[[], None] | None = None, signals: tuple[int, ...] = SIGNALS):
        self.command = command
        self.run_dir = Path(run_dir)
        self.announce = announce
        self.abort = abort
        self.signals = signals
        self.signum = 0  # the first signal received, 0 while none
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopAfterStep:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in self.signals:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            if previous is None:  # a handler installed outside Python: it could not be given back
                logger.debug("%s has a handler set outside Python; left in place", signal.Signals(signum).name)
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def requested(self, world_size: int = 1, device=None) -> int:
        """The signal to stop on, the same on every rank (0: carry on). With several ranks this is a collective
        (one all_reduce of one number): every rank calls it at the same point of every step."""
        if world_size <= 1:
            return self.signum
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # SIGTERM (15) wins over SIGINT (2) when ranks got both
        return int(flag.item())

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum:
            self._exit_now(signum, name)
        self.signum = signum
        self._say(f"medvl-engine {self.command}: {name}: stopping after the step in flight and saving a checkpoint "
                  f"in {self.run_dir}; {name} again stops at once")

    def _exit_now(self, signum: int, name: str) -> None:
        self.restore()  # a third signal while `abort` runs gets the default behaviour
        self._say(f"medvl-engine {self.command}: second {name}: stopped at once, the step in flight is lost; "
                  f"run the same command with --resume to continue from the last checkpoint in "
                  f"{self.run_dir / run_folder.CHECKPOINTS}")
        try:
            if self.abort is not None:
                self.abort()
            sys.stdout.flush()  # the printed metrics table
        except BaseException:  # noqa: BLE001 - nothing may keep the process from ending now
            pass
        os._exit(128 + signum)

    def _say(self, line: str) -> None:
        # A raw write: a signal handler may run while the main thread is inside a write to sys.stderr, whose
        # buffer refuses a reentrant call.
        if self.announce:
            start = "\n" if os.isatty(2) else ""  # below a terminal's progress bar, not inside its line
            os.write(2, f"{start}{line}\n".encode())


def preempted(command: str, signum: int, run_dir: str | Path, saved: Path, step: int, total: int, *,
              announce: bool = True) -> Preempted:
    """The `Preempted` a run raises once its checkpoint of `step` is `saved`."""
    name = signal.Signals(signum).name
    return Preempted(f"stopped by {name} after step {step} of {total}, checkpoint {saved}; to continue, run the same "
                     f"command with --resume (e.g. medvl-engine {command} --config {Path(run_dir) / run_folder.CONFIG} "
                     "--resume)", signum, announce=announce)


def exit_code(stop: Preempted, command: str) -> int:
    """What a trainer's `main` does with a `Preempted`: its one line on stderr (rank 0), the process group
    closed (every rank stopped after the same step, so the barrier meets), and the exit code."""
    from medvl_engine.trainers.distributed import shutdown

    if stop.announce:
        print(f"medvl-engine {command}: {stop}", file=sys.stderr)
    shutdown()
    return stop.exit_code
