"""Files written whole or not at all, and per-step logs cut back to a step."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomically(path: str | Path, data: str | bytes, *, fsync: bool = False) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, then rename it over `path`: a reader,
    or a run that stops midway, sees the old file or the new one, never a truncated mix. `fsync` also
    survives a machine crash (the data reach the disk before the rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
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
