"""The loop every filtering stage shares: rows in source order, in batches, kept or dropped with a reason.

    summary = run_stage(TextFilter(cfg.text), folder, cfg)

A stage object says what it decides (`decide(records) -> list[Decision]`, one per record, in order),
what state it keeps across a resume (`restore` / `extra`), and how it sums up (`summary`). This loop
reads the source lazily, writes `kept.jsonl` (the records kept, the next stage's input) and
`dropped.jsonl` (`{"id", "reason", "detail"}` per dropped row) as it goes, checkpoints through
`StageRun`, and shows a progress bar. A row that is not an image-caption record is dropped as
"bad row" with its id, never fatal.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from medvl_engine.config import to_dict
from medvl_engine.databuild.checkpoint import StageRun, reasons_table
from medvl_engine.databuild.records import BadRow, CaptionRecord, count_rows, encode_line, read_records
from medvl_engine.progress import Progress

logger = logging.getLogger(__name__)

KEPT, DROPPED = "kept.jsonl", "dropped.jsonl"


@dataclass(frozen=True)
class Decision:
    keep: bool
    reason: str = ""  # short and countable ("too small"); the summary groups by it
    detail: str = ""  # what exactly (which image, its size, the similar row)


class Stage:
    """What a filtering stage provides to `run_stage`; see the module docstring."""

    name = "stage"
    batch_size = 256
    extra_files: tuple[str, ...] = ()

    def identity(self) -> dict:
        """The settings that decide this stage's output (besides the input)."""
        return {}

    def restore(self, run: StageRun, extra: dict, counters: dict) -> None:
        """Rebuild in-memory state from the folder at its last checkpoint (dedup's index)."""

    def extra(self) -> dict:
        return {}

    def decide(self, records: list[CaptionRecord]) -> list[Decision]:
        raise NotImplementedError

    def summary(self, counters: dict) -> tuple[dict, str]:
        """Extra summary fields and markdown below the kept/dropped table."""
        return {}, ""

    def close(self) -> None:
        pass


def new_counters() -> dict:
    return {"kept": 0, "dropped": {}}


def drop(counters: dict, reason: str, n: int = 1) -> None:
    counters["dropped"][reason] = counters["dropped"].get(reason, 0) + n


def input_identity(input_cfg) -> dict:
    """The input's settings as they decide the output (a source path is taken absolute)."""
    values = to_dict(input_cfg)
    source = Path(values["source"])
    if source.exists():
        values["source"] = str(source.absolute())
    return values


def run_stage(stage: Stage, folder: Path, input_cfg, *, checkpoint_rows: int = 1000, overwrite: bool = False,
              show_progress: bool = True) -> dict:
    """Run (or resume, or just report a finished) `stage` over `input_cfg`'s rows into `folder`."""
    folder = Path(folder)
    run = StageRun(folder, stage.name, identity={"input": input_identity(input_cfg), stage.name: stage.identity()},
                   files=(KEPT, DROPPED, *stage.extra_files), checkpoint_rows=checkpoint_rows, overwrite=overwrite)
    state = run.open()
    if state.complete:
        run.close()
        stage.close()
        return json.loads((folder / "summary.json").read_text())
    counters = state.counters or new_counters()
    try:
        stage.restore(run, state.extra, counters)
        kept, dropped = run.files[KEPT], run.files[DROPPED]
        rows_done = state.rows_done
        rows = read_records(input_cfg, images_dir=folder / "images", start=rows_done)
        with Progress(count_rows(input_cfg), stage.name, unit="row", initial=rows_done, enabled=show_progress) as bar:
            while batch := list(itertools.islice(rows, stage.batch_size)):
                good = [r for _, r in batch if isinstance(r, CaptionRecord)]
                decisions = iter(stage.decide(good) if good else [])
                for _, record in batch:
                    if isinstance(record, BadRow):
                        decision = Decision(False, record.reason, record.detail)
                    else:
                        decision = next(decisions)
                    if decision.keep:
                        kept.write(encode_line(record))
                        counters["kept"] += 1
                    else:
                        dropped.write(encode_line({"id": record.id, "reason": decision.reason,
                                                   "detail": decision.detail}))
                        drop(counters, decision.reason)
                rows_done = batch[-1][0] + 1
                bar.update(len(batch))
                if run.due(rows_done):
                    run.checkpoint(rows_done, counters, stage.extra())
        extra_summary, extra_text = stage.summary(counters)
        summary = {"stage": stage.name, "rows": counters["kept"] + sum(counters["dropped"].values()),
                   "kept": counters["kept"], "dropped": dict(sorted(counters["dropped"].items())), **extra_summary}
        text = reasons_table(counters["kept"], counters["dropped"], stage.name) + extra_text
        run.finish(rows_done, counters, summary, text, stage.extra())
    finally:
        run.close()
        stage.close()
    return summary
