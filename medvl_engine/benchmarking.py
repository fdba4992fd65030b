"""Shared plumbing of the scripts in benchmarks/: environment rows, a text table, JSON output.

Every benchmark prints a table and writes one JSON row per measurement that carries the device,
the library versions, the git commit and the shapes, so a reader can tell where a number came from.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment() -> dict:
    """Device, versions and commit: the columns every JSON row starts with."""
    versions = {"python": platform.python_version()}
    for name in ("torch", "triton", "numpy", "transformers", "zmq", "msgspec"):
        try:
            module = __import__(name)
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            continue
    from medvl_engine import __version__

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "commit": git_commit(),
        "medvl_engine": __version__,
        "versions": versions,
    }


def median_time(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds (CPU timing; GPU benchmarks synchronise inside `fn`)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    cells = [[cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.rjust(w) for v, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def write_rows(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write one JSON object per line, each prefixed with the environment columns."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path
