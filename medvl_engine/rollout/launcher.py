"""WorkerProcess: start a rollout worker as a subprocess, watch it, restart it a bounded number of times.

    worker = WorkerProcess(["--model", path, "--data.source", "bundled", "--connect", endpoint,
                            "--producer-id", "worker-0"], max_restarts=3)
    worker.start()
    worker.wait()          # returns 0 when the worker finished; raises WorkerDied when it keeps dying

A restarted worker keeps its `--producer-id`, so it resumes the stream where the learner stands (see
medvl_engine.rollout.worker). Each run's output goes to a log file whose tail is quoted in the error; the
worker logs at this process's level (`--log-level`, see medvl_engine.logs).

The child's environment is this process's, plus `env`, plus `OMP_WAIT_POLICY=PASSIVE` unless either
sets it: a worker shares its cores with the learner, and OpenMP threads that spin at every barrier
while another process holds the core made 2-thread generate ~10x slower (SmolLM2-135M bf16, n=4 of
16 tokens, 2 cores at load ~7: 2-4 tok/s spinning, 27-30 tok/s passive).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# Environment a worker gets unless the caller's environment or `env` says otherwise (see the docstring).
CHILD_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


class WorkerDied(RuntimeError):
    """The worker exited with an error more often than its restarts allow."""


class WorkerProcess:
    """A supervised subprocess: `medvl-engine rollout-worker ARGS` unless `command` says otherwise."""

    def __init__(self, args: Sequence[str] = (), *, max_restarts: int = 3, restart_delay_s: float = 1.0,
                 command: Sequence[str] | None = None, env: dict[str, str] | None = None,
                 log_path: str | Path | None = None, name: str = "rollout-worker"):
        if max_restarts < 0:
            raise ValueError(f"WorkerProcess {name}: max_restarts must be >= 0, got {max_restarts}")
        if restart_delay_s < 0:
            raise ValueError(f"WorkerProcess {name}: restart_delay_s must be >= 0, got {restart_delay_s}")
        if command is None:
            from medvl_engine import logs

            command = [sys.executable, "-m", "medvl_engine.cli", "--log-level", logs.level_name(), "rollout-worker"]
        base = list(command)
        self.argv = base + list(args)
        self.name = name
        self.max_restarts = max_restarts
        self.restart_delay_s = restart_delay_s
        self.env = env
        self.log_path = Path(log_path) if log_path is not None else Path(
            tempfile.mkstemp(prefix=f"medvl-{name}-", suffix=".log")[1])
        self.restarts = 0
        self.started = 0.0  # time.monotonic() of the current process's start
        self.exit_codes: list[int] = []
        self._process: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError(f"WorkerProcess {self.name}: already running (pid {self._process.pid})")
        self._close_log()
        self._log = self.log_path.open("ab")
        env = {**CHILD_ENV_DEFAULTS, **os.environ, **(self.env or {})}
        # A session of its own: Ctrl-C at the learner's terminal reaches the learner, which stops its workers
        # after saving, not the workers too (which would exit and be restarted meanwhile).
        self._process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self.started = time.monotonic()

    def poll(self) -> int | None:
        """None while running; 0 once it finished cleanly. A failed exit restarts it, or raises WorkerDied."""
        if self._process is None:
            raise RuntimeError(f"WorkerProcess {self.name}: poll before start")
        code = self._process.poll()
        if code is None:
            return None
        if code == 0:
            self._close_log()
            return 0
        self.exit_codes.append(code)
        self._process = None
        if self.restarts >= self.max_restarts:
            self._close_log()
            raise WorkerDied(
                f"{self.name} exited with code {code} after {self.restarts} restart(s) (exit codes "
                f"{self.exit_codes}); last lines of {self.log_path}:\n{self.log_tail()}"
            )
        self.restarts += 1
        time.sleep(self.restart_delay_s)
        self.start()
        return None

    def wait(self, timeout: float | None = None, interval_s: float = 0.2) -> int:
        """Watch (restarting as needed) until the worker finishes cleanly; TimeoutError after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"WorkerProcess {self.name}: still running after {timeout} s")
            time.sleep(interval_s)

    def kill(self) -> None:
        """SIGKILL the current process, as a crash would; the next `poll` sees it and restarts it."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (then kill after `timeout` s) the current process; no restart follows."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._close_log()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
