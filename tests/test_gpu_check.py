"""scripts/gpu-check and scripts/fetch-gpu-wheels: the parts that run without a GPU or network."""

import importlib.util
import json
import sys
import time
import zipfile
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")
fetch_gpu_wheels = _load("fetch_gpu_wheels")


def _ctx(tmp_path, cuda=False, budget=60.0):
    return gpu_check.Context(python=sys.executable, cuda=cuda, deadline=time.monotonic() + budget, tmp=tmp_path)


def _steps(calls, fail=()):
    def make(name):
        def run(ctx, timeout):
            calls.append((name, timeout))
            if name in fail:
                raise RuntimeError(f"{name} broke")
            return gpu_check.StepResult(name, "ok", note=f"{name} ran")
        return run
    table = {name: gpu_check.Step(name, make(name), step.needs_cuda, step.timeout_s)
             for name, step in gpu_check.STEP_TABLE.items()}
    return table


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.steps == list(gpu_check.STEPS) and args.budget == 480 and args.out is None
    assert gpu_check.parse_args(["--steps", "bench", "compile", "--budget", "300"]).steps == ["bench", "compile"]
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--steps", "compile", "benchmark"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--budget", "5"])


def test_without_cuda_the_cuda_steps_are_skipped_with_the_reason(tmp_path):
    calls = []
    results = gpu_check.run_steps(_ctx(tmp_path), list(gpu_check.STEPS), _steps(calls))
    assert [c[0] for c in calls] == ["install", "compile"]
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == list(gpu_check.STEPS)
    for name in ("tests", "bench", "grpo"):
        assert by_name[name].status == "skipped"
        assert "needs CUDA" in by_name[name].note and "torch.cuda.is_available() is False" in by_name[name].note
    assert by_name["compile"].status == "ok"


def test_steps_run_in_order_within_the_budget_and_a_broken_step_does_not_stop_the_others(tmp_path):
    calls = []
    results = gpu_check.run_steps(_ctx(tmp_path, cuda=True), ["bench", "tests", "compile"],
                                  _steps(calls, fail=("tests",)))
    assert [c[0] for c in calls] == ["compile", "tests", "bench"]
    assert all(timeout <= 60 - gpu_check.RESERVE_S for _, timeout in calls)
    assert [(r.name, r.status) for r in results] == [("compile", "ok"), ("tests", "failed"), ("bench", "ok")]
    assert "RuntimeError: tests broke" in results[1].note

    calls.clear()
    late = gpu_check.run_steps(_ctx(tmp_path, cuda=True, budget=gpu_check.RESERVE_S + 1), ["compile"], _steps(calls))
    assert calls == [] and late[0].status == "skipped" and "out of time" in late[0].note


def _bench_rows(kernel_ms=(1.5, 3.0), ref_ms=(10.0, 20.0)):
    n, v = 16384, 151936
    read = n * v * 2
    copy_gbps = 4000.0
    shape = f"N={n} V={v} bfloat16"
    rows = []
    for impl, (fwd, bwd) in (("torch", ref_ms), ("triton", kernel_ms)):
        for op, ms, moved in (("token_logprobs fwd", fwd, read), ("token_logprobs bwd", bwd, 2 * read)):
            gbps = moved / (ms / 1e3) / 1e9
            rows.append({"op": op, "impl": impl, "shape": shape, "ms": ms, "GB/s": gbps,
                         "of_copy_bw": gbps / copy_gbps})
    rows += [
        {"op": "linear_token_logprobs fwd+bwd", "impl": "torch", "shape": "N=16384 H=3584 V=151936 bfloat16",
         "ms": 100.0, "peak_mb": 30000.0, "of_matmuls": 1.6},
        {"op": "linear_token_logprobs fwd+bwd", "impl": "triton", "shape": "N=16384 H=3584 V=151936 bfloat16",
         "ms": 70.0, "peak_mb": 1500.0, "of_matmuls": 1.1},
        {"op": "group_advantages", "impl": "triton", "shape": "M=1048576 groups=65536", "ms": 0.04},
        {"op": "policy_loss fwd+bwd", "impl": "triton", "shape": "B=512 T=4096 fp32", "ms": 0.1, "of_copy_bw": 0.65},
        {"op": "token_logprobs", "impl": "torch", "shape": "N=65536 V=151936 bfloat16", "ms": "oom"},
    ]
    return rows


def test_goals_are_read_from_the_benchmark_rows():
    goals = {g["goal"].split(":")[1].strip(): g for g in gpu_check.goals(_bench_rows())}
    speed = goals[">= 3x log_softmax(x.float()).gather"]
    assert speed["measured"] == pytest.approx(30 / 4.5, abs=1e-4) and speed["met"] is True
    # Forward reads the [N, V] bf16 logits, backward reads them and writes their gradient: 3 x 5 GB in 4.5 ms,
    # against a 4 TB/s copy bandwidth.
    share = goals[">= 80% of copy bandwidth"]
    assert share["measured"] == pytest.approx(3 * 16384 * 151936 * 2 / 4.5e-3 / 4e12, abs=1e-4) and share["met"]
    assert goals["<= 1/10 the logits path's extra memory"]["measured"] == 0.05
    assert goals["<= 1.15x the matmuls' time"]["met"] is True
    assert goals["< 50 us"]["measured"] == 40.0 and goals["< 50 us"]["met"] is True
    assert goals[">= 70% of copy bandwidth"]["met"] is False


def test_goals_not_measured_are_none_not_failed():
    goals = gpu_check.goals([])
    assert len(goals) == 6 and all(g["measured"] is None and g["met"] is None for g in goals)


def test_junit_counts_and_failures(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="4" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.kernels.test_gpu_kernels" name="test_a"/>'
        '<testcase classname="tests.kernels.test_gpu_kernels" name="test_b"><failure message="grad: 3 &gt; 1"/>'
        '</testcase><testcase classname="x" name="test_c"><skipped/></testcase>'
        '<testcase classname="x" name="test_d"/></testsuite></testsuites>')
    counts = gpu_check.parse_junit(xml)
    assert (counts["passed"], counts["failures"], counts["skipped"]) == (2, 1, 1)
    assert counts["failed_tests"] == [{"test": "tests.kernels.test_gpu_kernels::test_b", "message": "grad: 3 > 1"}]


def test_report_location_and_contents(tmp_path):
    from datetime import UTC, datetime

    date = datetime(2026, 12, 2, 10, 30, 5, tzinfo=UTC)
    on_gpu = gpu_check.default_out("NVIDIA H200", True, date)
    assert on_gpu.parent == gpu_check.ROOT / "benchmarks" / "results"
    assert on_gpu.name == "gpu-check-2026-12-02-103005-nvidia-h200.json"
    assert gpu_check.default_out("cpu", False, date).parent != on_gpu.parent

    info = {"date": date.isoformat(), "device": "NVIDIA H200", "capability": "sm_90", "python": "3.12.3",
            "versions": {"torch": "2.11.0", "triton": "3.6.0"}, "driver": "580.65"}
    results = [gpu_check.StepResult("compile", "ok", 12.3, "fine"), gpu_check.StepResult("tests", "skipped")]
    path = gpu_check.write_report(tmp_path / "r.json", info, results, {"goals": []}, ["--steps", "compile"], 13.0)
    report = json.loads(path.read_text())
    assert report["device"] == "NVIDIA H200" and report["versions"]["triton"] == "3.6.0"
    assert report["date"] == "2026-12-02T10:30:05+00:00" and report["commit"]
    assert report["steps"][0] == {"name": "compile", "status": "ok", "seconds": 12.3, "note": "fine"}
    assert report["goals"] == [] and report["argv"] == ["--steps", "compile"]


def test_the_probe_reports_this_interpreters_versions_and_device():
    import torch

    info = gpu_check.probe(sys.executable)
    assert info["versions"]["torch"] == torch.__version__ and info["cuda"] == torch.cuda.is_available()


def test_a_run_without_cuda_writes_its_report_and_names_what_it_skipped(tmp_path, capsys, monkeypatch):
    # Stands in for a machine without CUDA even where this test runs on one.
    monkeypatch.setattr(gpu_check, "probe", lambda python: {"python": "3.12.3", "cuda": False, "device": "cpu",
                                                            "versions": {"torch": "2.11.0"}})
    out = tmp_path / "run.json"
    assert gpu_check.main(["--steps", "tests", "bench", "grpo", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("tests", "skipped"), ("bench", "skipped"),
                                                                    ("grpo", "skipped")]
    assert report["versions"] == {"torch": "2.11.0"} and report["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "needs CUDA" in printed and f"wrote {out}" in printed.splitlines()[-1]


# -- fetch-gpu-wheels -----------------------------------------------------------------------------------


def test_stand_in_wheel_declares_only_name_and_local_version(tmp_path):
    path = fetch_gpu_wheels.stub_wheel("torch", "2.11.0", tmp_path)
    assert path.name == "torch-2.11.0+present-py3-none-any.whl"
    with zipfile.ZipFile(path) as wheel:
        metadata = wheel.read("torch-2.11.0+present.dist-info/METADATA").decode()
        assert "Name: torch\nVersion: 2.11.0+present\n" in metadata and "Requires-Dist" not in metadata
        assert "Tag: py3-none-any" in wheel.read("torch-2.11.0+present.dist-info/WHEEL").decode()
    assert fetch_gpu_wheels.kept_out("torch", "2.11.0+present") and fetch_gpu_wheels.kept_out("transformers", "5.17.0")
    assert not fetch_gpu_wheels.kept_out("pyzmq", "27.3.0")


def test_requirements_and_target_options():
    names = [fetch_gpu_wheels.requirement_name(r) for r in fetch_gpu_wheels.requirements()]
    assert {"deepspeed", "datasets", "msgspec", "pyzmq", "pytest"} <= set(names)
    only = fetch_gpu_wheels.requirements(only=["pytest", "Hypothesis"])
    assert [fetch_gpu_wheels.requirement_name(r) for r in only] == ["pytest", "hypothesis"]
    with pytest.raises(SystemExit, match="torch"):
        fetch_gpu_wheels.requirements(only=["torch"])
    options = fetch_gpu_wheels.target_options()
    assert options[options.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in options
    assert "manylinux_2_17_x86_64" in options and "manylinux_2_34_x86_64" in options
