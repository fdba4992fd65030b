"""The run's metrics log: one JSON object per step in `run_dir/metrics.jsonl`, written by rank 0 only."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | Path, rank: int, *, append: bool = False):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.rank = rank
        self.file = None
        if rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = self.path.open("a" if append else "w")

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
