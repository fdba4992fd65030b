"""One prepared run on a briefly available GPU machine (one H100/H200, no network): install, check, measure.

    scripts/gpu-check                          # every step, in ~5-6 minutes on an H100/H200
    scripts/gpu-check --steps compile tests    # some steps (always in the order below)
    scripts/gpu-check --budget 420             # seconds for the whole run; steps that would start later are skipped
    scripts/gpu-check --out run.json           # default: benchmarks/results/gpu-check-<date>-<device>.json on a GPU,
                                               # the temp folder on a machine without one
    scripts/gpu-check --rehearse               # before a GPU exists: prove the install and the steps' code here

Steps, in order:
  install  the wheels carried in .gpu-wheels/ (scripts/fetch-gpu-wheels fills it beforehand) and this
           project, offline; outside a virtual environment into .gpu-venv/ (sees the system's torch)
  compile  every Triton kernel for sm_90 and sm_80 with this machine's Triton: errors, spills, registers
  tests    the `gpu`-marked kernel tests: real shapes, bf16 and fp32, forward and backward, float64 oracle
  bench    benchmarks/bench_kernels.py at N = 16k tokens, and the kernels' goals checked on its rows
  grpo     the `gpu`-marked learner tests under tests/trainers (tests/trainers/test_learner_cuda.py): the
           fused head at Qwen2.5's vocabulary in bf16, one colocated GRPO step on images, memory weight
           sync and export, the engine's memory hand-off; each records its timings in the JSON
Every step ends `passed`, `failed` or `not run` (with the reason): a step that needs CUDA on a machine
without it, one that would start past the budget, a pytest step that collected no test or skipped
every test it collected, are `not run`, never a pass. The script exits 0 only when every step asked
for passed; without CUDA it says "nothing ran on a GPU" and exits 1. The JSON (each step's status,
reason and test counts: collected, passed, failed, skipped) is written either way and a short table of
steps and goals is printed last. Uses only the standard library
itself: everything that needs torch runs in a subprocess of the environment the install step chose.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".gpu-wheels"
REQUIREMENTS = ROOT / "scripts" / "gpu-requirements.txt"
VENV = ROOT / ".gpu-venv"
STEPS = ("install", "compile", "tests", "bench", "grpo")
BUDGET_S = 480  # 8 minutes of a borrowed machine
RESERVE_S = 10  # kept for writing the report


@dataclasses.dataclass
class Context:
    python: str  # the interpreter of every step after install
    cuda: bool
    deadline: float
    tmp: Path
    device: str = "cpu"
    report: dict = dataclasses.field(default_factory=dict)  # what steps add besides their status


PASSED, FAILED, NOT_RUN = "passed", "failed", "not run"


@dataclasses.dataclass
class StepResult:
    name: str
    status: str  # passed | failed | not run
    seconds: float = 0.0
    note: str = ""  # what happened; for `not run`, why
    counts: dict | None = None  # pytest steps: collected, passed, failed, skipped


# -- running commands ---------------------------------------------------------------------------------


def run_command(cmd: list[str], timeout: float, env: dict | None = None) -> tuple[int | None, str, float]:
    """(exit code or None on timeout, the output's last 4000 characters, seconds)."""
    start = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as expired:
        code = None
        output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                          for x in (expired.stdout, expired.stderr))
    return code, output[-4000:], time.monotonic() - start


PROBE = """
import json, platform, importlib
info = {"python": platform.python_version(), "cuda": False, "device": "cpu", "versions": {}}
for name in ("torch", "triton", "transformers", "deepspeed", "datasets", "msgspec", "zmq", "numpy", "pytest"):
    try:
        info["versions"][name] = getattr(importlib.import_module(name), "__version__", "?")
    except Exception:
        pass
try:
    import torch
    info["versions"]["torch.cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["cuda"] = True
        info["device"] = torch.cuda.get_device_name()
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability()
except Exception:
    pass
print(json.dumps(info))
"""


def probe(python: str) -> dict:
    """Versions, CUDA and the device name as `python` sees them (imports torch in a subprocess)."""
    code, output, _ = run_command([python, "-c", PROBE], timeout=120)
    if code != 0:
        return {"python": "?", "cuda": False, "device": "cpu", "versions": {}, "probe_error": output[-500:]}
    info = json.loads(output.strip().splitlines()[-1])
    driver = _nvidia_smi_driver()
    if driver:
        info["driver"] = driver
    return info


def _nvidia_smi_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


# -- the steps ----------------------------------------------------------------------------------------


def step_install(ctx: Context, timeout: float) -> StepResult:
    notes = []
    if sys.prefix == sys.base_prefix and ctx.python == sys.executable:
        # A system Python may refuse pip (PEP 668): a virtual environment that sees its packages.
        if not (VENV / "bin" / "python").exists():
            code, output, _ = run_command([sys.executable, "-m", "venv", "--system-site-packages", str(VENV)], 120)
            if code != 0:
                return StepResult("install", FAILED, note=f"could not create {VENV.name}: {output[-300:]}")
        ctx.python = str(VENV / "bin" / "python")
        notes.append(f"into {VENV.name}/")
    pip = [ctx.python, "-m", "pip", "install", "--no-index", "--disable-pip-version-check", "-q"]
    env = {k: v for k, v in os.environ.items() if k != "PIP_CONSTRAINT"}
    start = time.monotonic()
    if WHEELS.is_dir() and any(WHEELS.glob("*.whl")):
        code, output, _ = run_command([*pip, "--find-links", str(WHEELS), "-r", str(REQUIREMENTS)], timeout, env)
        if code != 0:
            # Install what the carried wheels allow, one requirement at a time, and name the rest.
            missing = []
            for req in read_requirements():
                left = timeout - (time.monotonic() - start)
                if run_command([*pip, "--find-links", str(WHEELS), req], left, env)[0] != 0:
                    missing.append(req)
            notes.append(f"not installed: {' '.join(missing)}" if missing else "installed one by one")
    else:
        notes.append(f"no {WHEELS.name}/ (run scripts/fetch-gpu-wheels where there is network); "
                     "using what is installed")
    left = timeout - (time.monotonic() - start)
    code, output, _ = run_command([*pip, "--no-build-isolation", "--no-deps", "-e", str(ROOT)], left, env)
    if code is None:
        return StepResult("install", FAILED, note="timed out building the project")
    if code != 0:
        return StepResult("install", FAILED, note="project build failed: " + output[-600:])
    # Some carried wheels missing is a failed install, even when the steps after it can run.
    return StepResult("install", FAILED if any(n.startswith("not installed") for n in notes) else PASSED,
                      note="; ".join(notes))


def read_requirements() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text().splitlines())
    return [line for line in lines if line]


def step_compile(ctx: Context, timeout: float) -> StepResult:
    out = ctx.tmp / "compile.json"
    code, output, _ = run_command([ctx.python, "-m", "medvl_engine.kernels.compile_check", "--fresh-cache",
                                   "--json", str(out)], timeout)
    if code is None:
        return StepResult("compile", FAILED, note="timed out")
    if not out.exists():
        return StepResult("compile", FAILED, note=output[-600:])
    report = json.loads(out.read_text())
    ctx.report["compile"] = {"triton": report.get("triton"), "launches_per_target": report.get("launches"),
                             "wall_s": report.get("wall_s"), "kernels": compile_summary(report["results"]),
                             "failures": [line for line in output.splitlines() if line.startswith("FAIL")]}
    note = f"triton {report.get('triton')}: {len(report['results'])} compiles"
    if code != 0:
        return StepResult("compile", FAILED, note=f"{note}; " + "; ".join(ctx.report["compile"]["failures"]
                                                                          or [output[-300:]]))
    if not report["results"]:
        return StepResult("compile", NOT_RUN, note=f"{note}: nothing was compiled")
    return StepResult("compile", PASSED, note=f"{note}, no error, spill or register overrun")


def compile_summary(results: list[dict]) -> list[dict]:
    """Per kernel and target: configurations, most registers, spill bytes, errors, ptxas and PTX versions."""
    rows: dict[tuple, dict] = {}
    for r in results:
        row = rows.setdefault((r["kernel"], r["arch"]), {"kernel": r["kernel"], "arch": r["arch"], "configs": 0,
                                                         "max_registers": 0, "spill_bytes": 0, "errors": 0})
        row["configs"] += 1
        row["max_registers"] = max(row["max_registers"], r.get("registers", 0))
        row["spill_bytes"] += r.get("spill_stores", 0) + r.get("spill_loads", 0)
        row["errors"] += "error" in r
        for key in ("ptxas", "ptx_version"):
            if key in r:
                row[key] = r[key]
    return list(rows.values())


def parse_junit(path: Path) -> dict:
    """Counts and the failing tests of a pytest --junitxml file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed, properties = [], {}
    for case in root.iter("testcase"):
        # What a test recorded with pytest's record_property (timings, measured errors, memory).
        recorded = {p.get("name"): p.get("value") for p in case.iter("property")}
        if recorded:
            properties[f"{case.get('classname')}::{case.get('name')}"] = recorded
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            failed.append({"test": f"{case.get('classname')}::{case.get('name')}",
                           "message": (bad.get("message") or "")[:500]})
    counts["failed_tests"] = failed
    counts["recorded"] = properties
    return counts


def pytest_verdict(name: str, code: int | None, counts: dict | None, output: str) -> StepResult:
    """A pytest run's verdict: `not run` when it collected nothing or skipped everything it collected."""
    if code is None:
        return StepResult(name, FAILED, note="timed out: " + output[-300:], counts=counts)
    if code == 5 or (counts is not None and counts["tests"] == 0):  # pytest: no tests collected
        return StepResult(name, NOT_RUN, note="no test collected", counts=counts)
    if counts is None:
        return StepResult(name, FAILED, note=output[-600:])
    failed = counts["failures"] + counts["errors"]
    note = f"{counts['passed']} passed, {failed} failed, {counts['skipped']} skipped of {counts['tests']}"
    if counts["failed_tests"]:
        note += ": " + ", ".join(t["test"].rsplit("::", 1)[-1] for t in counts["failed_tests"])[:400]
    step_counts = {"collected": counts["tests"], "passed": counts["passed"], "failed": failed,
                   "skipped": counts["skipped"]}
    if failed or code != 0:
        return StepResult(name, FAILED, note=note, counts=step_counts)
    if counts["passed"] == 0:
        return StepResult(name, NOT_RUN, note=f"every collected test skipped ({note})", counts=step_counts)
    return StepResult(name, PASSED, note=note, counts=step_counts)


def _pytest_step(ctx: Context, name: str, paths: list[str], timeout: float, env: dict | None = None) -> StepResult:
    xml = ctx.tmp / f"{name}.xml"
    # xunit1: the junit family that keeps record_property values per test case.
    cmd = [ctx.python, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
           f"--junitxml={xml}", *paths]
    code, output, _ = run_command(cmd, timeout, None if env is None else {**os.environ, **env})
    counts = parse_junit(xml) if xml.exists() else None
    if counts is not None:
        ctx.report[name] = counts
    return pytest_verdict(name, code, counts, output)


def step_tests(ctx: Context, timeout: float) -> StepResult:
    return _pytest_step(ctx, "tests", ["tests/kernels"], timeout)


def step_grpo(ctx: Context, timeout: float) -> StepResult:
    # DeepSpeed on the GPU (the tests' conftest defaults it to the CPU accelerator).
    return _pytest_step(ctx, "grpo", ["tests/trainers"], timeout, {"DS_ACCELERATOR": "cuda"})


def step_bench(ctx: Context, timeout: float) -> StepResult:
    out = ctx.tmp / "bench.jsonl"
    code, output, _ = run_command([ctx.python, "benchmarks/bench_kernels.py", "--rows", "16384", "--out", str(out)],
                                  timeout)
    # The environment columns every row starts with are the report's own top-level fields.
    env_keys = {"date", "device", "commit", "medvl_engine", "versions"}
    rows = [{k: v for k, v in json.loads(line).items() if k not in env_keys}
            for line in out.read_text().splitlines()] if out.exists() else []
    ctx.report["bench"] = rows
    ctx.report["goals"] = goals(rows)
    if code is None:
        return StepResult("bench", FAILED, note=f"timed out after {len(rows)} rows")
    if code != 0:
        return StepResult("bench", FAILED, note=output[-600:])
    if not rows:
        return StepResult("bench", NOT_RUN, note="the benchmark wrote no row")
    met = sum(g["met"] is True for g in ctx.report["goals"])
    return StepResult("bench", PASSED, note=f"{len(rows)} rows; goals met {met}/{len(ctx.report['goals'])}")


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Context, float], StepResult]
    needs_cuda: bool
    timeout_s: float


STEP_TABLE = {
    "install": Step("install", step_install, False, 180),
    "compile": Step("compile", step_compile, False, 150),
    "tests": Step("tests", step_tests, True, 200),
    "bench": Step("bench", step_bench, True, 200),
    "grpo": Step("grpo", step_grpo, True, 150),
}


def run_steps(ctx: Context, names: list[str], steps: dict[str, Step] = STEP_TABLE) -> list[StepResult]:
    """Run `names` in STEPS order; skip what needs CUDA without it, and what would start past the deadline."""
    results = []
    for name in [n for n in STEPS if n in names]:
        step = steps[name]
        left = ctx.deadline - time.monotonic() - RESERVE_S
        if step.needs_cuda and not ctx.cuda:
            results.append(StepResult(name, NOT_RUN, note="needs CUDA: torch.cuda.is_available() is False here"))
            continue
        if left < 5:
            results.append(StepResult(name, NOT_RUN, note="out of time (--budget)"))
            continue
        timeout = min(step.timeout_s, left)
        print(f"[gpu-check] {name} (up to {timeout:.0f} s)", flush=True)
        results.append(timed_step(name, lambda s=step, t=timeout: s.run(ctx, t), "gpu-check"))
    return results


def timed_step(name: str, run: Callable[[], StepResult], label: str) -> StepResult:
    """`run()` timed and printed; an exception is the step's failure, never the end of the others."""
    start = time.monotonic()
    try:
        result = run()
    except Exception as error:  # noqa: BLE001 - one broken step must not lose the others' results
        result = StepResult(name, FAILED, note=f"{type(error).__name__}: {error}")
    result.seconds = round(time.monotonic() - start, 1)
    print(f"[{label}] {name}: {result.status} in {result.seconds} s {result.note}", flush=True)
    return result


# -- goals of the kernels (issue 15), checked on bench_kernels rows -----------------------------------


def _find(rows, op, impl, shape_has):
    for row in rows:
        if row.get("op") == op and row.get("impl") == impl and shape_has in str(row.get("shape", "")):
            if isinstance(row.get("ms"), (int, float)):
                return row
    return None


def goals(rows: list[dict]) -> list[dict]:
    """Each goal: what it asks, the measured value, and whether it is met (None: not measured)."""
    out = []

    def add(goal, value, met, unit=""):
        out.append({"goal": goal, "measured": None if value is None else round(value, 4), "unit": unit,
                    "met": None if value is None else bool(met)})

    shape = "N=16384 V=151936 bfloat16"
    fwd_k, bwd_k = (_find(rows, f"token_logprobs {p}", "triton", shape) for p in ("fwd", "bwd"))
    fwd_r, bwd_r = (_find(rows, f"token_logprobs {p}", "torch", shape) for p in ("fwd", "bwd"))
    speedup = share = None
    if fwd_k and bwd_k and fwd_r and bwd_r:
        speedup = (fwd_r["ms"] + bwd_r["ms"]) / (fwd_k["ms"] + bwd_k["ms"])
    if fwd_k and bwd_k and fwd_k.get("of_copy_bw"):
        copy_gbps = fwd_k["GB/s"] / fwd_k["of_copy_bw"]
        moved_gb = fwd_k["GB/s"] * fwd_k["ms"] / 1e3 + bwd_k["GB/s"] * bwd_k["ms"] / 1e3
        share = moved_gb / ((fwd_k["ms"] + bwd_k["ms"]) / 1e3) / copy_gbps
    add("token_logprobs fwd+bwd [16k, 151936] bf16: >= 3x log_softmax(x.float()).gather", speedup,
        speedup is not None and speedup >= 3, "x")
    add("token_logprobs fwd+bwd [16k, 151936] bf16: >= 80% of copy bandwidth", share,
        share is not None and share >= 0.8, "of copy")

    lin_k = _find(rows, "linear_token_logprobs fwd+bwd", "triton", "N=16384 H=3584")
    lin_r = _find(rows, "linear_token_logprobs fwd+bwd", "torch", "N=16384 H=3584")
    memory = lin_k["peak_mb"] / lin_r["peak_mb"] if lin_k and lin_r and lin_r.get("peak_mb") else None
    add("linear_token_logprobs H=3584: <= 1/10 the logits path's extra memory", memory,
        memory is not None and memory <= 0.1, "of torch")
    matmuls = lin_k.get("of_matmuls") if lin_k else None
    add("linear_token_logprobs H=3584: <= 1.15x the matmuls' time", matmuls,
        matmuls is not None and matmuls <= 1.15, "x matmuls")

    adv = _find(rows, "group_advantages", "triton", "M=1048576")
    us = adv["ms"] * 1e3 if adv else None
    add("group_advantages 1M rewards in 64k groups: < 50 us", us, us is not None and us < 50, "us")

    loss = _find(rows, "policy_loss fwd+bwd", "triton", "")
    bw = loss.get("of_copy_bw") if loss else None
    add("policy_loss fwd+bwd: >= 70% of copy bandwidth", bw, bw is not None and bw >= 0.7, "of copy")
    return out


# -- report -------------------------------------------------------------------------------------------


def steps_table(results: list[StepResult], width: int) -> str:
    """The printed table of steps, each note cut to `width` characters."""
    steps = [{**dataclasses.asdict(r), "note": r.note if len(r.note) <= width else r.note[:width - 3] + "..."}
             for r in results]
    return format_table(steps, ["name", "status", "seconds", "note"])


def format_table(rows: list[dict], columns: list[str]) -> str:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def default_out(device: str, cuda: bool, date: datetime) -> Path:
    """benchmarks/results/ holds what was measured on a GPU; a run without one goes to the temp folder."""
    tag = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "cpu"
    name = f"gpu-check-{date.strftime('%Y-%m-%d-%H%M%S')}-{tag}.json"
    return (ROOT / "benchmarks" / "results" if cuda else Path(tempfile.gettempdir())) / name


def write_report(path: Path, info: dict, results: list[StepResult], extra: dict, argv: list[str],
                 wall_s: float) -> Path:
    report = {
        "date": info["date"], "device": info.get("device"), "capability": info.get("capability"),
        "driver": info.get("driver"), "commit": git_commit(), "python": info.get("python"),
        "versions": info.get("versions", {}), "argv": argv, "wall_s": round(wall_s, 1),
        "steps": [dataclasses.asdict(r) for r in results], **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), metavar="STEP",
                        help=f"steps to run, of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (default: 480)")
    parser.add_argument("--out", type=Path, default=None, help="the JSON report (default: see above)")
    parser.add_argument("--rehearse", action="store_true",
                        help="prove the install and the steps' code on this machine, without a GPU (see above)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}: choose from {', '.join(STEPS)}")
    if args.budget <= RESERVE_S:
        parser.error(f"--budget must be more than {RESERVE_S} s")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rehearse:
        # The rehearsal imports this module by name: run as a script, this is it, not a second copy.
        sys.modules.setdefault("gpu_check", sys.modules[__name__])
        from gpu_rehearse import rehearse

        return rehearse()
    start = time.monotonic()
    date = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="medvl-gpu-check-") as tmp:
        python = str(VENV / "bin" / "python") if (VENV / "bin" / "python").exists() else sys.executable
        info = probe(python)
        ctx = Context(python=python, cuda=info["cuda"], deadline=start + args.budget, tmp=Path(tmp),
                      device=info["device"])
        if not ctx.cuda:
            print("[gpu-check] no CUDA device: the tests, bench and grpo steps will not run", flush=True)
        results = run_steps(ctx, args.steps)
        if "install" in args.steps:
            info = probe(ctx.python)  # versions after the install
        info["date"] = date.isoformat(timespec="seconds")
        out = write_report(args.out or default_out(ctx.device, ctx.cuda, date), info, results, ctx.report,
                           sys.argv[1:] if argv is None else list(argv), time.monotonic() - start)
    print()
    print(f"gpu-check on {info.get('device')} ({info.get('capability', '-')}, driver {info.get('driver', '-')}), "
          f"torch {info['versions'].get('torch', '-')}, triton {info['versions'].get('triton', '-')}, "
          f"commit {git_commit()}, {time.monotonic() - start:.0f} s")
    print(steps_table(results, 110))
    if ctx.report.get("goals"):
        print()
        print(format_table(ctx.report["goals"], ["goal", "measured", "unit", "met"]))
    print(f"\nwrote {out}")
    code, verdict = exit_verdict(results, ctx.cuda)
    print(verdict)
    return code


def exit_verdict(results: list[StepResult], cuda: bool) -> tuple[int, str]:
    """0 only when every step asked for passed; a run on a machine without CUDA never passes."""
    if not cuda:
        return 1, "gpu-check: FAILED: nothing ran on a GPU (no CUDA device here)"
    bad = [f"{r.name} {r.status}" for r in results if r.status != PASSED]
    if bad:
        return 1, "gpu-check: FAILED: " + ", ".join(bad)
    return 0, f"gpu-check: passed ({len(results)} steps)"


if __name__ == "__main__":
    sys.exit(main())
