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
            return gpu_check.StepResult(name, "passed", note=f"{name} ran")
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


def test_without_cuda_the_cuda_steps_are_not_run_with_the_reason(tmp_path):
    calls = []
    results = gpu_check.run_steps(_ctx(tmp_path), list(gpu_check.STEPS), _steps(calls))
    assert [c[0] for c in calls] == ["install", "compile"]
    by_name = {r.name: r for r in results}
    assert [r.name for r in results] == list(gpu_check.STEPS)
    for name in ("tests", "bench", "grpo"):
        assert by_name[name].status == "not run"
        assert "needs CUDA" in by_name[name].note and "torch.cuda.is_available() is False" in by_name[name].note
    assert by_name["compile"].status == "passed"
    # Install and compile passed, but nothing ran on a GPU: the run does not pass.
    code, verdict = gpu_check.exit_verdict(results, cuda=False)
    assert code == 1 and "nothing ran on a GPU" in verdict


def test_steps_run_in_order_within_the_budget_and_a_broken_step_does_not_stop_the_others(tmp_path):
    calls = []
    results = gpu_check.run_steps(_ctx(tmp_path, cuda=True), ["bench", "tests", "compile"],
                                  _steps(calls, fail=("tests",)))
    assert [c[0] for c in calls] == ["compile", "tests", "bench"]
    assert all(timeout <= 60 - gpu_check.RESERVE_S for _, timeout in calls)
    assert [(r.name, r.status) for r in results] == [("compile", "passed"), ("tests", "failed"), ("bench", "passed")]
    assert gpu_check.exit_verdict(results, cuda=True) == (1, "gpu-check: FAILED: tests failed")
    assert "RuntimeError: tests broke" in results[1].note

    calls.clear()
    late = gpu_check.run_steps(_ctx(tmp_path, cuda=True, budget=gpu_check.RESERVE_S + 1), ["compile"], _steps(calls))
    assert calls == [] and late[0].status == "not run" and "out of time" in late[0].note
    assert gpu_check.exit_verdict(late, cuda=True)[0] == 1
    assert gpu_check.exit_verdict(results[:1], cuda=True) == (0, "gpu-check: passed (1 steps)")


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
    results = [gpu_check.StepResult("compile", "passed", 12.3, "fine"),
               gpu_check.StepResult("tests", "passed", 30.0, "3 passed",
                                    {"collected": 3, "passed": 3, "failed": 0, "skipped": 0})]
    path = gpu_check.write_report(tmp_path / "r.json", info, results, {"goals": []}, ["--steps", "compile"], 13.0)
    report = json.loads(path.read_text())
    assert report["device"] == "NVIDIA H200" and report["versions"]["triton"] == "3.6.0"
    assert report["date"] == "2026-12-02T10:30:05+00:00" and report["commit"]
    assert report["steps"][0] == {"name": "compile", "status": "passed", "seconds": 12.3, "note": "fine",
                                  "counts": None}
    assert report["steps"][1]["counts"] == {"collected": 3, "passed": 3, "failed": 0, "skipped": 0}
    assert report["goals"] == [] and report["argv"] == ["--steps", "compile"]


def test_the_probe_reports_this_interpreters_versions_and_device():
    import torch

    info = gpu_check.probe(sys.executable)
    assert info["versions"]["torch"] == torch.__version__ and info["cuda"] == torch.cuda.is_available()


def test_a_run_without_cuda_writes_its_report_and_fails_saying_nothing_ran_on_a_gpu(tmp_path, capsys, monkeypatch):
    # Stands in for a machine without CUDA even where this test runs on one.
    monkeypatch.setattr(gpu_check, "probe", lambda python: {"python": "3.12.3", "cuda": False, "device": "cpu",
                                                            "versions": {"torch": "2.11.0"}})
    out = tmp_path / "run.json"
    assert gpu_check.main(["--steps", "tests", "bench", "grpo", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("tests", "not run"), ("bench", "not run"),
                                                                    ("grpo", "not run")]
    assert report["versions"] == {"torch": "2.11.0"} and report["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "needs CUDA" in printed and f"wrote {out}" in printed
    assert "nothing ran on a GPU" in printed.splitlines()[-1]


def _junit(tmp_path, tests, failures=0, skipped=0):
    xml = tmp_path / "j.xml"
    cases = "".join(f'<testcase classname="c" name="t{i}">{"<skipped/>" if i < skipped else ""}</testcase>'
                    for i in range(tests))
    xml.write_text(f'<testsuites><testsuite name="pytest" tests="{tests}" failures="{failures}" errors="0" '
                   f'skipped="{skipped}">{cases}</testsuite></testsuites>')
    return gpu_check.parse_junit(xml)


def test_a_pytest_step_that_tested_nothing_is_not_run_never_passed(tmp_path):
    nothing = gpu_check.pytest_verdict("grpo", 5, None, "no tests ran")
    assert nothing.status == "not run" and nothing.note == "no test collected"
    all_skipped = gpu_check.pytest_verdict("tests", 0, _junit(tmp_path, 4, skipped=4), "")
    assert all_skipped.status == "not run" and "every collected test skipped" in all_skipped.note
    assert all_skipped.counts == {"collected": 4, "passed": 0, "failed": 0, "skipped": 4}
    some = gpu_check.pytest_verdict("tests", 0, _junit(tmp_path, 4, skipped=1), "")
    assert some.status == "passed" and some.counts["passed"] == 3
    assert gpu_check.pytest_verdict("tests", 1, _junit(tmp_path, 4, failures=1), "").status == "failed"
    assert gpu_check.pytest_verdict("tests", None, None, "killed").status == "failed"


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
    assert {"deepspeed", "msgspec", "pyzmq", "pytest"} <= set(names)
    only = fetch_gpu_wheels.requirements(only=["pytest", "Hypothesis"])
    assert [fetch_gpu_wheels.requirement_name(r) for r in only] == ["pytest", "hypothesis"]
    with pytest.raises(SystemExit, match="torch"):
        fetch_gpu_wheels.requirements(only=["torch"])
    options = fetch_gpu_wheels.target_options()
    assert options[options.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in options
    assert "manylinux_2_17_x86_64" in options and "manylinux_2_34_x86_64" in options


def test_the_carried_size_is_checked_against_the_machines_limit(tmp_path, capsys):
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(b"x" * 2**20)
    tree = fetch_gpu_wheels.tree_bytes() / 2**20
    assert fetch_gpu_wheels.check_carried_size(tmp_path, limit_mib=tree + 2)[0] == 0
    assert "1.0 MiB" in capsys.readouterr().out
    assert fetch_gpu_wheels.check_carried_size(tmp_path, limit_mib=tree + 0.5)[0] == 1
    assert "over the limit" in capsys.readouterr().err and fetch_gpu_wheels.CARRY_LIMIT_MIB == 64


def test_gpu_requirements_pin_the_locked_versions():
    # The GPU machine runs the versions the CPU tests ran; datasets stays out (pyarrow is over the limit).
    lock = dict(line.split("==") for line in (SCRIPTS / "lock-main.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    pins = [r for r in fetch_gpu_wheels.requirements() if "==" in r]
    assert len(pins) >= 6
    for pin in pins:
        name, version = pin.split("==")
        assert lock[name] == version, (pin, lock.get(name))
    assert "datasets" not in {fetch_gpu_wheels.requirement_name(r) for r in fetch_gpu_wheels.requirements()}


def test_recorded_properties_reach_the_report(tmp_path):
    xml = tmp_path / "p.xml"
    xml.write_text('<testsuites><testsuite name="pytest" tests="1" failures="0" errors="0" skipped="0">'
                   '<testcase classname="tests.trainers.test_learner_cuda" name="test_x"><properties>'
                   '<property name="step_s" value="1.5"/></properties></testcase></testsuite></testsuites>')
    counts = gpu_check.parse_junit(xml)
    assert counts["recorded"] == {"tests.trainers.test_learner_cuda::test_x": {"step_s": "1.5"}}
