"""Compile every Triton kernel for real GPU targets on a machine without a GPU, and read ptxas's report.

Triton compiles ahead of time once a driver says which GPU it targets: a stub driver that only
reports `GPUTarget("cuda", arch, 32)` lets each kernel's `warmup(...)` run every stage down to a
cubin, through the ptxas that Triton ships and with Triton's own ptxas flags (`-v` among them), so
ptxas's log gives registers, spills and stack per kernel. The launches come from the launchers
themselves: each launcher runs on meta tensors (no memory, no data) with its device decisions made
for CUDA, and every kernel launch it makes is recorded with its dtypes, integers, constexprs and
warps; identical specialisations compile once.

    python -m medvl_engine.kernels.compile_check                    # sm_90 and sm_80: table, exit 1 on a failure
    python -m medvl_engine.kernels.compile_check --arch 90 --json out.json --fresh-cache

The compiling runs in subprocesses (one per target, more with --jobs) started without
TRITON_INTERPRET: a process whose triton was imported under the interpreter cannot compile.
TRITON_PTXAS_PATH / TRITON_PTXAS_BLACKWELL_PATH and TRITON_CACHE_DIR are honoured, as in any Triton
run; a kernel found in Triton's cache skips compiling but still goes through ptxas for the report.
This module records the launches, runs the subprocesses and checks their results (`REGISTER_BUDGETS`);
the stub driver, the ptxas log and the compiling itself are `medvl_engine.kernels.compile_target`.
The test is tests/kernels/test_gpu_compile.py; tests/kernels/test_gpu_kernels.py runs the kernels on a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from unittest import mock

import torch

from medvl_engine.kernels.compile_target import KERNEL_MODULES, compile_launches, kernel_module

TARGETS = (90, 80)  # H100/H200, A100

# Shapes of the learner's hot path: Qwen2.5-VL's vocabulary and hidden size, 16k tokens per micro-batch.
VOCAB = 151_936
ODD_VOCAB = VOCAB + 1  # a row length that is not a multiple of 16 elements: scalar loads
ROWS = 16_384
BATCH, SEQ = 16, 1024  # the [B, T, V] view `logits[:, :-1]` of a [16, 1025, V] model output
HIDDEN = 3584
SAMPLES = 1 << 20  # rewards per group_advantages call
POLICY_BATCH, POLICY_SEQ = 512, 4096
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Registers per thread each kernel may use in any configuration, on any target: 16 above the most
# measured (in brackets: Triton 3.9, ptxas 13.4 for sm_90 and 12.9 for sm_80), rounded up to 8, so
# a different ptxas passes and a real growth (another block-wide tensor live per thread) fails.
# Registers set occupancy: an SM's 65,536 hold 4 programs of 8 warps (the row kernels) at <= 64
# registers, 3 at <= 80; 7 programs of 4 warps (the elementwise kernels) at <= 72, 5 at <= 96.
REGISTER_BUDGETS = {
    "_token_logprobs_fwd_kernel": 56,  # [40]
    "_token_logprobs_bwd_kernel": 80,  # [62 on sm_80, 48 on sm_90]
    "_linear_token_logprobs_fwd_kernel": 56,  # [40]
    "_linear_token_logprobs_bwd_kernel": 56,  # [40]
    "_group_advantages_stats_kernel": 80,  # [64]
    "_group_advantages_squares_kernel": 64,  # [48]
    "_group_advantages_kernel": 88,  # [69]
    "_policy_loss_seq_kernel": 48,  # [32]
    "_policy_loss_fwd_kernel": 112,  # [96 with dual-clip, 72 without; GSPO's sequence ratio: 94, 72]
    "_policy_loss_bwd_kernel": 40,  # [18]
}


# -- recording the launchers' launches ---------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One kernel launch a launcher made: the arguments as warmup takes them (dtypes for tensors)."""

    kernel: str
    config: str
    args: tuple
    kwargs: dict
    covers: int = 1  # launcher configurations that specialise to this same compiled kernel

    def key(self) -> tuple:
        """What Triton specialises on: dtypes, integers equal to 1 / divisible by 16 / 64-bit, constexprs."""
        def spec(value):
            if isinstance(value, bool):
                return ("b",)
            if isinstance(value, int):
                return ("i", value == 1, value % 16 == 0, not -2**31 <= value < 2**31)
            if isinstance(value, float):
                return ("f",)
            return value
        return (self.kernel, tuple(spec(a) for a in self.args), tuple(sorted(self.kwargs.items())))


class _Recorder:
    """Stands in for `dispatch.launchable`: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self):
        self.launches: list[Launch] = []
        self.config = ""

    def launchable(self, kernel, device):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
                    recorder.launches.append(Launch(kernel.fn.__name__, recorder.config, args, dict(kwargs)))
                return launch
        return _Grid()


@contextlib.contextmanager
def _recording() -> Iterator[_Recorder]:
    """Patch the kernel modules so their launchers record launches on meta tensors as if on CUDA."""
    from medvl_engine.kernels import dispatch

    recorder = _Recorder()
    cuda = torch.device("cuda")
    with contextlib.ExitStack() as stack:
        for module_name in KERNEL_MODULES:
            module = kernel_module(module_name)
            stack.enter_context(mock.patch.object(module, "launchable", recorder.launchable))
            # The device decisions (block widths, who rounds bf16) are the launchers' own, made for CUDA.
            if hasattr(module, "block_size"):
                stack.enter_context(mock.patch.object(
                    module, "block_size", lambda length, device, **caps: dispatch.block_size(length, cuda, **caps)))
            if hasattr(module, "bf16_by_bits"):
                stack.enter_context(mock.patch.object(
                    module, "bf16_by_bits", lambda dtype, device: dispatch.bf16_by_bits(dtype, cuda)))
        yield recorder


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
            torch.int64: "i64", torch.int32: "i32", torch.bool: "bool"}.get(dtype, str(dtype))


# Which of (d logp, d entropy) arrive in a backward: the launchers' three cases with work to do.
GRAD_CASES = {"logp": (True, False), "entropy": (False, True), "logp+entropy": (True, True)}


def _token_logprobs_launches(rec: _Recorder) -> None:
    tl_ops = kernel_module("token_logprobs")
    layouts = [(VOCAB, "[N, V]"), (VOCAB, "[B, T, V] view"), (ODD_VOCAB, "[N, V]")]
    for dtype, (vocab, layout) in itertools.product(FLOAT_DTYPES, layouts):
        if layout == "[N, V]":
            logits, tokens = _meta(ROWS, vocab, dtype=dtype), _meta(ROWS, dtype=torch.int64)
        else:
            logits, tokens = _meta(BATCH, SEQ + 1, vocab, dtype=dtype)[:, :-1], _meta(BATCH, SEQ, dtype=torch.int64)
        stats = _meta(tokens.numel())
        for entropy in (False, True):
            rec.config = f"{_short(dtype)} V={vocab} {layout} entropy={entropy}"
            tl_ops.token_logprobs_forward(logits, tokens, 1.0, entropy)
        for grads, (has_logp, has_entropy) in GRAD_CASES.items():
            rec.config = f"{_short(dtype)} V={vocab} {layout} d {grads}"
            tl_ops.token_logprobs_backward(logits, tokens, stats, stats if has_entropy else None,
                                           stats if has_logp else None, stats if has_entropy else None, 1.0)


def _linear_token_logprobs_launches(rec: _Recorder) -> None:
    lin = kernel_module("linear_token_logprobs")
    tokens = _meta(ROWS, dtype=torch.int64)
    stats = _meta(ROWS)
    for dtype in FLOAT_DTYPES:
        hidden, weight = _meta(ROWS, HIDDEN, dtype=dtype), _meta(VOCAB, HIDDEN, dtype=dtype)
        rec.config = f"{_short(dtype)} N={ROWS} H={HIDDEN} V={VOCAB} chunk={lin.DEFAULT_CHUNK}"
        lin.linear_token_logprobs_forward(hidden, weight, tokens, 1.0, lin.DEFAULT_CHUNK, True)
        for grads, (has_logp, has_entropy) in GRAD_CASES.items():
            rec.config = f"{_short(dtype)} N={ROWS} H={HIDDEN} V={VOCAB} chunk={lin.DEFAULT_CHUNK} d {grads}"
            lin.linear_token_logprobs_backward(hidden, weight, tokens, stats, stats if has_entropy else None,
                                               stats if has_logp else None, stats if has_entropy else None, 1.0,
                                               lin.DEFAULT_CHUNK, True, True)


def _group_advantages_launches(rec: _Recorder) -> None:
    ga = kernel_module("group_advantages")
    from medvl_engine.kernels.reference import ADVANTAGE_MODES

    for dtype, index_dtype, mode in itertools.product(FLOAT_DTYPES, (torch.int64, torch.int32), ADVANTAGE_MODES):
        rec.config = f"{_short(dtype)} index {_short(index_dtype)} M={SAMPLES} {mode}"
        ga.group_advantages_forward(_meta(SAMPLES, dtype=dtype), _meta(SAMPLES, dtype=index_dtype), mode, 1e-6)


def _policy_loss_launches(rec: _Recorder) -> None:
    pl = kernel_module("policy_loss")
    from medvl_engine.kernels.reference import DUAL_CLIP_RATIO, KL_TYPES, LOSS_MODES

    b, t = POLICY_BATCH, POLICY_SEQ
    # Without a reference the KL type is never read: one of them stands for all.
    kls = [(False, KL_TYPES[0])] + [(True, kl) for kl in KL_TYPES]
    # clip_ratio_c None turns dual-clip off; gspo adds the sequence pass and the SEQ_RATIO forward.
    for dtype, (has_ref, kl_type), mask_dtype, per_token, dual, loss in itertools.product(
            FLOAT_DTYPES, kls, (torch.bool, torch.float32), (False, True), (None, DUAL_CLIP_RATIO), LOSS_MODES):
        logp = _meta(b, t, dtype=dtype)
        advantages = _meta(b, t) if per_token else _meta(b)
        rec.config = (f"{_short(dtype)} B={b} T={t} ref={kl_type if has_ref else None} mask {_short(mask_dtype)} "
                      f"adv {'[B, T]' if per_token else '[B]'} dual_clip={dual} loss={loss}")
        pl.policy_loss_forward(logp, _meta(b, t, dtype=dtype), advantages, _meta(b, t, dtype=mask_dtype),
                               _meta(b, t, dtype=dtype) if has_ref else None, 0.2, 0.28, dual,
                               0.01 if has_ref else 0.0, kl_type, "token-mean", loss)
    for dtype in FLOAT_DTYPES:
        rec.config = f"{_short(dtype)} B={b} T={t}"
        pl.policy_loss_backward(_meta(b, t), _meta(b), _meta(), dtype)


LAUNCHERS: tuple[Callable[[_Recorder], None], ...] = (
    _token_logprobs_launches, _linear_token_logprobs_launches, _group_advantages_launches, _policy_loss_launches)


def launcher_launches() -> list[Launch]:
    """Every distinct launch the launchers make over the configurations above, first label kept."""
    with _recording() as rec:
        for launcher in LAUNCHERS:
            launcher(rec)
    unique: dict[tuple, Launch] = {}
    configs: dict[tuple, set[str]] = {}
    for launch in rec.launches:
        unique.setdefault(launch.key(), launch)
        configs.setdefault(launch.key(), set()).add(launch.config)
    return [dataclasses.replace(launch, covers=len(configs[key])) for key, launch in unique.items()]


def problems(row: dict, budgets: dict[str, int] = REGISTER_BUDGETS) -> list[str]:
    """Why one compiled configuration fails the check: a compile error, a spill, or registers over budget."""
    if "error" in row:
        return [f"compile error: {row['error']}"]
    found = []
    if row["spill_stores"] or row["spill_loads"]:
        found.append(f"spills {row['spill_stores']} B stored / {row['spill_loads']} B loaded")
    budget = budgets.get(row["kernel"])
    if budget is None:
        found.append("no register budget for this kernel in REGISTER_BUDGETS")
    elif row["registers"] > budget:
        found.append(f"{row['registers']} registers > budget {budget}")
    return found


def _clean_env(cache_dir: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if cache_dir is not None:
        env["TRITON_CACHE_DIR"] = cache_dir
    return env


def check(archs: Sequence[int] = TARGETS, *, jobs: int | None = None, fresh_cache: bool = False,
          timeout: float = 600) -> dict:
    """Compile every launch for each target in clean subprocesses, `jobs` of them at once (default: one
    per target up to the CPU count, each target's launches split evenly).

    Kernels already in Triton's cache (a stub target's cubin is what a real GPU of that kind would
    build) are not compiled again, only put through ptxas again for its report; `fresh_cache`
    compiles everything in an empty cache. Returns {"triton": version, "launches": n, "results":
    [rows], "wall_s": s}; a subprocess that failed contributes one row with its "error".
    """
    start = time.perf_counter()
    jobs = jobs or max(len(archs), min(os.cpu_count() or 1, 16))
    shards = max(1, jobs // len(archs))
    with tempfile.TemporaryDirectory(prefix="medvl-compile-check-") as tmp:
        procs = []
        for arch, shard in itertools.product(archs, range(shards)):
            out = os.path.join(tmp, f"sm_{arch}-{shard}.json")
            cmd = [sys.executable, "-m", "medvl_engine.kernels.compile_check", "--worker", "--arch", str(arch),
                   "--shard", f"{shard}/{shards}", "--json", out]
            cache_dir = os.path.join(tmp, "cache") if fresh_cache else None
            procs.append((arch, out, subprocess.Popen(cmd, env=_clean_env(cache_dir), stdout=subprocess.PIPE,
                                                      stderr=subprocess.STDOUT, text=True)))
        report = {"results": []}
        deadline = time.monotonic() + timeout
        for arch, out, proc in procs:
            try:
                output, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
                output += f"\n(timed out after {timeout:.0f} s)"
            if proc.returncode != 0 or not os.path.exists(out):
                report["results"].append({"arch": f"sm_{arch}", "kernel": "*", "config": "*",
                                          "error": f"compile worker exited {proc.returncode}:\n{output[-4000:]}"})
                continue
            with open(out) as f:
                part = json.load(f)
            report["triton"] = part["triton"]
            report["launches"] = part["launches"]
            report["results"] += part["results"]
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def summary(results: Sequence[dict]) -> list[dict]:
    """One row per (kernel, target): configurations, most registers, spills, widest load, failures."""
    rows = {}
    for r in results:
        row = rows.setdefault((r["kernel"], r["arch"]), {
            "kernel": r["kernel"], "arch": r["arch"], "configs": 0, "max_regs": 0,
            "budget": REGISTER_BUDGETS.get(r["kernel"], ""), "spill_bytes": 0, "widest_load_bits": 0,
            "compile_s": 0.0, "failures": 0, "ptxas": r.get("ptxas", "")})
        row["configs"] += 1
        row["max_regs"] = max(row["max_regs"], r.get("registers", 0))
        row["spill_bytes"] += r.get("spill_stores", 0) + r.get("spill_loads", 0)
        row["widest_load_bits"] = max(row["widest_load_bits"], r.get("widest_load_bits", 0))
        row["compile_s"] = round(row["compile_s"] + r.get("compile_s", 0.0), 2)
        row["failures"] += bool(problems(r))
    return list(rows.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(TARGETS), help="compute capabilities, e.g. 90 80")
    parser.add_argument("--json", default=None, help="write the full report (every configuration) here")
    parser.add_argument("--fresh-cache", action="store_true", help="compile everything in an empty Triton cache")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes at once (default: CPUs, <= 16)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import triton

        launches = launcher_launches()
        index, count = map(int, args.shard.split("/"))
        report = {"triton": triton.__version__, "launches": len(launches),
                  "results": [r for arch in args.arch for r in compile_launches(arch, launches[index::count])]}
        with open(args.json, "w") as f:
            json.dump(report, f)
        return 0

    report = check(args.arch, jobs=args.jobs, fresh_cache=args.fresh_cache)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    from medvl_engine.benchmarking import format_table

    print(f"triton {report.get('triton', '?')}: {report.get('launches', 0)} distinct launches per target, "
          f"{report['wall_s']} s")
    print(format_table(summary(report["results"]), ["kernel", "arch", "configs", "max_regs", "budget",
                                                    "spill_bytes", "widest_load_bits", "compile_s", "failures",
                                                    "ptxas"]))
    failed = [(r, p) for r in report["results"] for p in problems(r)]
    for r, p in failed:
        print(f"FAIL {r['arch']} {r['kernel']} [{r['config']}]: {p}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
