"""A stage's run folder: a manifest, output files written as rows are processed, checkpoints, resume.

    run = StageRun(folder, "filter-text", identity=settings, files=("kept.jsonl", "dropped.jsonl"))
    state = run.open()                       # fresh, or the last checkpoint of an earlier attempt
    for position, record in read_records(cfg, start=state.rows_done):
        run.files["kept.jsonl"].write(...)
        if run.due(position + 1):
            run.checkpoint(position + 1, counters)
    run.finish(rows, counters, summary)

Rows are processed in source order and every output line is appended as its row is decided, so a
checkpoint is only a number: how many source rows are done, with the byte length of every output file
at that moment and the counters for the summary (`state.json`, replaced atomically after the files
are flushed and synced). Resuming truncates every file back to its checkpointed length (dropping
whatever a crash left after it, a torn line included) and starts reading the source at `rows_done`;
the rows after the checkpoint are decided again the same way, so the finished files equal those of
an uninterrupted run byte for byte. A crash costs at most `checkpoint_rows` rows of work.

`manifest.json` holds the settings that decide the output (the run's identity) and one entry per
attempt (date, device, versions, commit): resuming with other settings is refused, so one folder never
mixes two configurations.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from medvl_engine import run_folder
from medvl_engine.errors import RunFolderError
from medvl_engine.files import write_atomically

MANIFEST_NAME = run_folder.MANIFEST  # the same name as an eval run's, another layout (a stage's)
STATE_NAME = "state.json"


@dataclass
class StageState:
    """Where a stage stands: source rows done, summary counters, stage-specific extras, finished or not."""

    rows_done: int = 0
    counters: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    complete: bool = False


def _diff(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new)):
            lines += _diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return lines
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} in the folder, {new!r} now"]


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n", fsync=True)


class StageRun:
    """The run folder of one stage (see the module docstring)."""

    def __init__(self, folder: str | Path, stage: str, *, identity: dict, files: tuple[str, ...],
                 checkpoint_rows: int = 1000, overwrite: bool = False):
        self.folder = Path(folder)
        self.stage = stage
        self.identity = identity
        self.names = tuple(files)
        self.checkpoint_rows = checkpoint_rows
        self.overwrite = overwrite
        self.files: dict = {}
        self._last = 0

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_NAME

    def open(self) -> StageState:
        """Create or resume the folder; opens every output file for appending at its checkpointed length."""
        from medvl_engine.benchmarking import environment

        if self.overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest_path = self.folder / MANIFEST_NAME
        attempt = environment()
        if manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("stage") != self.stage:
                raise RunFolderError(f"{self.folder} holds a {manifest.get('stage')!r} stage, not {self.stage!r}")
            changed = _diff(manifest.get("identity", {}), self.identity)
            if changed:
                raise RunFolderError(f"{self.folder} holds a run with other settings; resuming it would mix outputs "
                                     f"({'; '.join(changed)}). Use another folder or --overwrite.")
            manifest["attempts"].append(attempt)
        elif any(self.folder.iterdir()):
            raise RunFolderError(f"{self.folder} is not empty and has no {MANIFEST_NAME}; use another folder "
                                 "or --overwrite")
        else:
            manifest = {"stage": self.stage, "identity": self.identity, "attempts": [attempt]}
        _write_json(manifest_path, manifest)
        state = StageState()
        sizes: dict[str, int] = {}
        if self.state_path.is_file():
            saved = json.loads(self.state_path.read_text())
            state = StageState(saved["rows_done"], saved["counters"], saved.get("extra", {}), saved["complete"])
            sizes = saved["sizes"]
        for name in self.names:
            path = self.folder / name
            size = sizes.get(name, 0)
            if path.exists():
                if path.stat().st_size < size:
                    raise RunFolderError(f"{path} is shorter ({path.stat().st_size} bytes) than its checkpoint "
                                         f"({size} bytes): the folder was changed by hand; use --overwrite")
                with path.open("r+b") as f:
                    f.truncate(size)  # what a crash left after the checkpoint is decided again
            self.files[name] = path.open("ab")
        self._last = state.rows_done
        return state

    def due(self, rows_done: int) -> bool:
        return rows_done - self._last >= self.checkpoint_rows

    def checkpoint(self, rows_done: int, counters: dict, extra: dict | None = None, *, complete: bool = False) -> None:
        """Flush and sync the outputs, then record how far they go (atomically)."""
        sizes = {}
        for name, f in self.files.items():
            f.flush()
            os.fsync(f.fileno())
            sizes[name] = f.tell()
        _write_json(self.state_path, {"rows_done": rows_done, "sizes": sizes, "counters": counters,
                                      "extra": extra or {}, "complete": complete})
        self._last = rows_done

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files = {}

    def finish(self, rows_done: int, counters: dict, summary: dict, text: str, extra: dict | None = None) -> None:
        """The last checkpoint (complete) and the summary beside the outputs (summary.json, summary.md)."""
        self.checkpoint(rows_done, counters, extra, complete=True)
        self.close()
        _write_json(self.folder / "summary.json", summary)
        (self.folder / "summary.md").write_text(text)


def reasons_table(kept: int, dropped: dict[str, int], title: str) -> str:
    """A markdown table: kept and each drop reason with its count and share of the rows seen."""
    total = kept + sum(dropped.values())
    lines = [f"## {title}", "", "| outcome | rows | share % |", "|:---|---:|---:|"]

    def row(name, count):
        lines.append(f"| {name} | {count} | {100 * count / total if total else 0:.1f} |")

    row("kept", kept)
    for reason, count in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
        row(f"dropped: {reason}", count)
    lines.append(f"| **rows seen** | {total} | |")
    return "\n".join(lines) + "\n"
