"""Ctrl-C during `eval` / `passrate`: the command stops within a few seconds even while a backend's thread is
in the middle of a long generate call, keeps every finished question in its results file, prints one
line (no traceback) and exits 130; running it again resumes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]

# A backend that generates in a worker thread, as the hf backend does: questions 0..2 answer at once, any
# later one holds the thread for a minute (a long CPU generate call), unless FAST is set (the rerun).
SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, time
    from concurrent.futures import ThreadPoolExecutor
    sys.path[:0] = [{tests!r}, {rollout!r}]
    from scripted_backend import ScriptedBackend, correct_answer
    import medvl_engine.evals.runner as runner
    from medvl_engine.cli import main
    from medvl_engine.rollout.types import Completion

    class ThreadBackend(ScriptedBackend):
        def __init__(self):
            super().__init__("thread")
            self.executor = ThreadPoolExecutor(1)

        async def generate(self, request, params):
            def work():
                time.sleep(0.01 if request.position < 3 or os.environ.get("FAST") else 60)
                texts = [correct_answer(request, k) for k in range(params.n)]
                return [Completion(token_ids=[1], text=t, logprobs=None, finish_reason="stop", weight_version=0)
                        for t in texts]
            return await asyncio.get_running_loop().run_in_executor(self.executor, work)

        async def shutdown(self):
            self.executor.shutdown()

    class Renderer:
        chat_template = "{{% for m in messages %}}{{{{ m.content }}}}{{% endfor %}}"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return "".join(str(m["content"]) for m in messages)

        def __call__(self, text, add_special_tokens=False):
            return {{"input_ids": list(range(1, 1 + min(len(text), 50)))}}

    runner.build_backends = lambda rollout, model, samples=(): ([ThreadBackend()], Renderer())
    sys.argv = ["medvl-engine", *sys.argv[1:]]
    sys.exit(main())
""")


def _launch(tmp_path, command: str, extra_env: dict | None = None) -> subprocess.Popen:
    script = tmp_path / "run_command.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), rollout=str(TESTS / "rollout")))
    (tmp_path / "model").mkdir(exist_ok=True)
    args = [sys.executable, str(script), command, "--model", str(tmp_path / "model"), "--output",
            str(tmp_path / "run"), "--data.source", "bundled", "--data.ignore-images", "--data.max-samples", "8"]
    if command == "passrate":
        args += ["--rollout.n", "2"]
    env = {**__import__("os").environ, **(extra_env or {})}
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("command, results", [("eval", "v0/results.jsonl"), ("passrate", "results.jsonl")])
def test_ctrl_c_stops_at_once_keeps_finished_answers_and_prints_one_line(tmp_path, command, results):
    results_path = tmp_path / "run" / results
    process = _launch(tmp_path, command)
    deadline = time.monotonic() + 120
    while len(_lines(results_path)) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the first three questions never finished"
        time.sleep(0.1)
    time.sleep(0.5)  # question 3 is now inside its minute-long generate call
    process.send_signal(signal.SIGINT)
    start = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - start < 5
    assert process.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"medvl-engine {command}: interrupted: 3 answered questions kept in "
                                           f"{results_path}; run the same command again to resume")
    assert sorted(r["dataset_index"] for r in _lines(results_path)) == [0, 1, 2]  # in the order they finished

    rerun = _launch(tmp_path, command, {"FAST": "1"})
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert sorted(r["dataset_index"] for r in _lines(results_path)) == list(range(8))
