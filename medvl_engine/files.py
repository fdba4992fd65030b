"""Files written whole or not at all, and per-step logs cut back to a step (`StepLog`)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def write_atomically(path: str | Path, data: str | bytes | Iterable[str | bytes], *, fsync: bool = False) -> Path:
    """Write `data` (text as UTF-8; an iterable of pieces is written piece by piece) to a temporary file beside
    `path`, then rename it over `path`: a reader, or a run that stops midway, sees the old file or the new one,
    never a truncated mix. `fsync` also survives a machine crash (the data reach the disk before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            for piece in [data] if isinstance(data, (str, bytes)) else data:
                f.write(piece.encode("utf-8") if isinstance(piece, str) else piece)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def truncate_to_step(path: Path, step: int) -> None:
    """Keep the lines of a per-step jsonl log up to `step` (a resumed run rewrites the steps after its
    checkpoint; without this they would appear twice)."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and line.endswith(b"\n") and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        write_atomically(path, b"".join(kept))


class StepLog:
    """A per-step jsonl log of a run folder (`metrics.jsonl`, `rollouts.jsonl`, `timeline.jsonl`): a new run
    starts it empty, a resumed one (`resume_step`) cuts it back to that step (`truncate_to_step`) and appends.
    Disabled (`enabled=False`: not rank 0, or switched off), it opens nothing and every write is a no-op.

    `file` is the open binary file (None when disabled or closed). The logs built on it write through
    `append` (bytes) or `append_rows` (one JSON object per line)."""

    def __init__(self, path: str | Path, *, enabled: bool = True, resume_step: int | None = None):
        self.path = Path(path)
        self.file = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            truncate_to_step(self.path, resume_step)
        self.file = self.path.open("ab" if resume_step is not None else "wb")

    def append(self, data: bytes, *, flush: bool = True) -> None:
        if self.file is not None:
            self.file.write(data)
            if flush:
                self.file.flush()

    def append_rows(self, rows, *, flush: bool = True) -> None:
        """One `json.dumps(row)` line per row."""
        if self.file is not None:
            self.append(b"".join(json.dumps(row).encode() + b"\n" for row in rows), flush=flush)

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
