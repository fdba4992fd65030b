"""`scripts/gpu-check --rehearse`: the GPU run's install and its steps' code, proven on a machine without a GPU.

  venv         a throw-away environment of this interpreter, with a current pip
  resolve      the carried wheels (.gpu-wheels/) resolve offline for the GPU machine's CPython 3.12 and
               platform, with stand-ins of its torch, Triton and transformers as installed
  size         wheels and source tree within what the GPU machine takes (64 MiB)
  environment  the GPU machine's Triton and transformers and the carried versions, installed from their
               CPython 3.11 twins (.gpu-wheels-py311/) with no index, torch from this machine; no datasets
  compile      gpu-check's compile step in that environment (the GPU machine's Triton)
  collect      the collection of every `gpu` test there
  learner-on-cpu  the learner's CUDA tests run on the CPU (MEDVL_GPU_TESTS_ON_CPU=1)

`scripts/fetch-gpu-wheels --twins` fills both wheel folders beforehand.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from gpu_check import (
    FAILED,
    PASSED,
    REQUIREMENTS,
    ROOT,
    WHEELS,
    StepResult,
    parse_junit,
    probe,
    pytest_verdict,
    run_command,
    steps_table,
    timed_step,
)

TWINS = ROOT / ".gpu-wheels-py311"
GPU_MACHINE = {"python": "3.12", "torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0"}


def _fetch_module():
    spec = importlib.util.spec_from_file_location("fetch_gpu_wheels", ROOT / "scripts" / "fetch_gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(name: str, fn) -> StepResult:
    return timed_step(name, fn, "rehearse")


def rehearse_resolve(tmp: Path, python: str) -> StepResult:
    """The carried wheels resolve offline for the GPU machine's interpreter and platform, with its torch,
    Triton and transformers standing in as installed."""
    fetch = _fetch_module()
    stubs = tmp / "present"
    stubs.mkdir()
    present = {k: v for k, v in GPU_MACHINE.items() if k != "python"}
    for name, version in present.items():
        fetch.stub_wheel(name, version, stubs)
    constraints = tmp / "present.txt"
    constraints.write_text("".join(f"{n}=={v}+{fetch.LOCAL_TAG}\n" for n, v in present.items()))
    report = tmp / "resolve.json"
    cmd = [python, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "-q",
           "--find-links", str(WHEELS), "--find-links", str(stubs), "-c", str(constraints),
           "--target", str(tmp / "target"), "--report", str(report), *fetch.target_options(GPU_MACHINE["python"]),
           "-r", str(REQUIREMENTS), *(f"{n}=={v}+{fetch.LOCAL_TAG}" for n, v in present.items())]
    code, output, _ = run_command(cmd, 300, _pip_env())
    if code != 0:
        return StepResult("resolve", FAILED, note=output[-600:])
    items = [i["metadata"] for i in json.loads(report.read_text())["install"]]
    carried = [m for m in items if not m["version"].endswith(f"+{fetch.LOCAL_TAG}")]
    return StepResult("resolve", PASSED, note=f"{len(carried)} carried packages install on CPython "
                      f"{GPU_MACHINE['python']} beside torch {present['torch']}, triton {present['triton']}, "
                      f"transformers {present['transformers']}")


def rehearse_size() -> StepResult:
    fetch = _fetch_module()
    code, wheel_mib, total_mib = fetch.check_carried_size(WHEELS)
    note = f"{total_mib:.1f} MiB of {fetch.CARRY_LIMIT_MIB} (wheels {wheel_mib:.1f} MiB)"
    return StepResult("size", PASSED if code == 0 else FAILED, note=note)


def _pip_env() -> dict:
    # The CPU environment's lock pins transformers 5.25 and triton 3.9: it must not reach these installs.
    return {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "VIRTUAL_ENV")}


def make_venv(venv: Path) -> StepResult:
    """A throw-away environment of this interpreter, with a current pip (pip 23's `--python-version`
    resolution checks Requires-Python against the running interpreter instead of the target)."""
    code, output, _ = run_command([sys.executable, "-m", "venv", str(venv)], 120)
    if code == 0:
        code, output, _ = run_command([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-U", "pip"],
                                      300, _pip_env())
    if code != 0:
        return StepResult("venv", FAILED, note=output[-400:])
    pip_version = run_command([str(venv / "bin" / "python"), "-m", "pip", "--version"], 60)[1].split()[1]
    return StepResult("venv", PASSED, note=f"python {platform.python_version()}, pip {pip_version}")


def rehearse_env(tmp: Path, venv: Path) -> StepResult:
    """The GPU machine's versions installed from the 3.11 twins, no index, and the project; torch and what it
    needs (sympy, networkx, jinja2, ... all on the GPU machine beside its torch) from this machine."""
    env = _pip_env()
    python = str(venv / "bin" / "python")
    torch_version = importlib.metadata.version("torch").split("+")[0] if _has("torch") else "2.13.0"
    steps = [
        [python, "-m", "pip", "install", "-q", f"torch=={torch_version}"],
        [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(TWINS), "-r", str(REQUIREMENTS),
         *(f"{n}=={v}" for n, v in GPU_MACHINE.items() if n not in ("python", "torch")), "scikit-build-core",
         "pybind11"],
        [python, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation", "--no-deps", "-e", str(ROOT)],
    ]
    for cmd in steps:
        code, output, _ = run_command(cmd, 600, env)
        if code != 0:
            return StepResult("environment", FAILED, note=" ".join(cmd[3:6]) + ": " + output[-600:])
    info = probe(python)
    versions = info.get("versions", {})
    absent = run_command([python, "-c", "import datasets"], 60)[0] != 0
    return StepResult("environment", PASSED if absent else FAILED,
                      note=f"python {info.get('python')}, torch {versions.get('torch')}, "
                           f"triton {versions.get('triton')}, transformers {versions.get('transformers')}, "
                           f"deepspeed {versions.get('deepspeed')}; "
                           + ("no datasets" if absent else "datasets is installed: the carried set must not need it"))


def _has(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def rehearse_steps(tmp: Path, venv: Path) -> list[StepResult]:
    """In the rehearsal environment: gpu-check's compile step, the collection of its CUDA steps, and the
    learner's CUDA tests run on the CPU (MEDVL_GPU_TESTS_ON_CPU=1)."""
    python = str(venv / "bin" / "python")
    results = []

    def compile_step():
        out = tmp / "compile-run.json"
        run_command([python, "scripts/gpu_check.py", "--steps", "compile", "--out", str(out)], 400)
        if not out.exists():
            return StepResult("compile", FAILED, note="gpu-check wrote no report")
        step = json.loads(out.read_text())["steps"][0]
        return StepResult("compile", step["status"], note=step["note"])

    def collect_step():
        code, output, _ = run_command([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                                       "-p", "no:cacheprovider", "tests/kernels", "tests/trainers"], 300)
        tests = [line for line in output.splitlines() if "::" in line]
        if code != 0 or not tests:
            return StepResult("collect", FAILED, note=output[-600:])
        learner = sum("tests/trainers" in t for t in tests)
        return StepResult("collect", PASSED, note=f"{len(tests)} gpu tests collected ({learner} of the learner)")

    def learner_step():
        xml = tmp / "learner.xml"
        env = dict(_pip_env(), MEDVL_GPU_TESTS_ON_CPU="1", OMP_NUM_THREADS="2")
        code, output, _ = run_command([python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                                       "-o", "junit_family=xunit1", f"--junitxml={xml}",
                                       "tests/trainers/test_learner_cuda.py"], 900, env)
        return pytest_verdict("learner-on-cpu", code, parse_junit(xml) if xml.exists() else None, output)

    for name, fn in (("compile", compile_step), ("collect", collect_step), ("learner-on-cpu", learner_step)):
        results.append(_timed(name, fn))
    return results


def rehearse() -> int:
    missing = [folder.name for folder in (WHEELS, TWINS) if not any(folder.glob("*.whl"))]
    if missing:
        print(f"[rehearse] {' and '.join(missing)} missing: run scripts/fetch-gpu-wheels --twins first "
              "(on a machine with network)", file=sys.stderr)
        return 2
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="medvl-gpu-rehearse-") as tmp:
        tmp = Path(tmp)
        venv = tmp / "venv"
        python = str(venv / "bin" / "python")
        results = [_timed("venv", lambda: make_venv(venv))]
        if results[-1].status == PASSED:
            results += [_timed("resolve", lambda: rehearse_resolve(tmp, python)), _timed("size", rehearse_size),
                        _timed("environment", lambda: rehearse_env(tmp, venv))]
        if results[-1].status == PASSED:
            results += rehearse_steps(tmp, venv)
    print(f"\ngpu-check --rehearse, {time.monotonic() - start:.0f} s")
    print(steps_table(results, 150))
    bad = [f"{r.name} {r.status}" for r in results if r.status != PASSED]
    print("rehearsal: FAILED: " + ", ".join(bad) if bad else "rehearsal: passed")
    return 1 if bad else 0
