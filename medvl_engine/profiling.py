"""Profiling a run: named ranges around its stages, torch.profiler traces of chosen steps, and its timeline.

    with stage("backward"):               # "medvl/backward" in a torch.profiler trace, an NVTX range on CUDA
        learner.backward(loss)

    profiler = StepProfiler.from_config(cfg.profile, run_dir, rank)    # --profile.steps 3-5
    with profiler:
        profiler.begin(3); ...; profiler.end(3)       # profile/trace-rank{R}.json (chrome://tracing, Perfetto)

    with Timeline(run_dir, rank) as timeline:         # timeline.jsonl, drawn by `medvl-engine report` as timeline.png
        timeline.write(step, "learner", [("update", start, end)])

A range costs ~0.5 us (two flag checks) when no profiler records and CUDA is not initialized; entering
`torch.profiler.record_function` unconditionally would cost ~10 us (measured on the CPU), too much for
the transport's sends. Ranges are started and ended by handle (record_function's handle, NVTX
range_start/range_end), not pushed on a stack, so the generate ranges of groups interleaved on one
event loop stay correct. The stages: generate, score, send, receive, rollout_wait, collate,
old_logprobs, ref_logprobs, forward, loss, backward, optimizer_step, weight_sync (and its parts
weight_sync/gather, /load, /export, /broadcast), grpo_step, sft_step, eval_generate; none is per token.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from medvl_engine import run_folder
from medvl_engine.files import StepLog

PREFIX = "medvl/"
TIMELINE_NAME = run_folder.TIMELINE


class stage:  # noqa: N801 - used like a function: `with stage("loss"):`
    """A named range `medvl/{name}`: a record_function while torch.profiler records on this thread, an NVTX
    range while CUDA is initialized. With `spans` (a list) it also appends `(name, start, end)` in
    wall-clock seconds (`time.time()`), the learner's lane of the timeline."""

    __slots__ = ("name", "spans", "_record", "_nvtx", "_start")

    def __init__(self, name: str, spans: list | None = None):
        self.name = name
        self.spans = spans
        self._record = None
        self._nvtx = None

    def __enter__(self) -> stage:
        # Without torch imported nothing can record (the transport and the rollout pool do not need torch).
        torch = sys.modules.get("torch")
        if torch is not None:
            if torch.autograd._profiler_enabled():
                self._record = torch.profiler.record_function(PREFIX + self.name)
                self._record.__enter__()
            if torch.cuda.is_initialized():
                self._nvtx = torch.cuda.nvtx.range_start(PREFIX + self.name)
        if self.spans is not None:
            self._start = time.time()
        return self

    def __exit__(self, *exc) -> None:
        if self.spans is not None:
            self.spans.append((self.name, self._start, time.time()))
        if self._nvtx is not None:
            sys.modules["torch"].cuda.nvtx.range_end(self._nvtx)
            self._nvtx = None
        if self._record is not None:
            self._record.__exit__(*exc)
            self._record = None


class StepProfiler:
    """torch.profiler over steps `first`..`last` (1-based, as in metrics.jsonl), one Chrome trace per rank.

    Started by hand before step `first` (or the first step of a resumed run inside the range) and stopped
    after step `last`, or when the run ends or fails before it: a trace of the steps that ran is written."""

    def __init__(self, steps: tuple[int, int] | None, folder: str | Path, rank: int, *, record_shapes: bool = False,
                 profile_memory: bool = False):
        self.steps = steps
        self.path = Path(folder) / f"trace-rank{rank}.json"
        self.record_shapes = record_shapes
        self.profile_memory = profile_memory
        self._profile = None
        self.written: Path | None = None

    @classmethod
    def from_config(cls, cfg, run_dir: str | Path, rank: int) -> StepProfiler:
        """From a `ProfileConfig`: its step range, in `cfg.dir` or `run_dir/profile`."""
        return cls(cfg.step_range, cfg.dir or Path(run_dir) / run_folder.PROFILE, rank,
                   record_shapes=cfg.record_shapes, profile_memory=cfg.profile_memory)

    @property
    def active(self) -> bool:
        return self._profile is not None

    def begin(self, step: int) -> None:
        """Step `step` is about to run."""
        if self.steps is None or self.active or self.written is not None:
            return
        first, last = self.steps
        if first <= step <= last:
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(ProfilerActivity.CUDA)
            self._profile = profile(activities=activities, record_shapes=self.record_shapes,
                                    profile_memory=self.profile_memory)
            self._profile.start()

    def end(self, step: int) -> None:
        """Step `step` finished."""
        if self.active and step >= self.steps[1]:
            self.stop()

    def stop(self) -> None:
        if not self.active:
            return
        profile, self._profile = self._profile, None
        profile.stop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profile.export_chrome_trace(str(self.path))
        self.written = self.path

    def __enter__(self) -> StepProfiler:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class Timeline(StepLog):
    """`timeline.jsonl`: one line per span, `{"step", "who", "stage", "start", "end"}`, in seconds since the
    run started (from wall-clock `time.time()` stamps: the rollout workers' generation spans, stamped in
    their processes on the same machine, fall on the same clock). Only rank 0 writes.

    A resumed run (`resume_step`) keeps the spans up to that step and continues the clock from the last
    kept span's end, so the picture has no overlapping sessions (the time between them is left out)."""

    def __init__(self, run_dir: str | Path, rank: int, *, resume_step: int | None = None, enabled: bool = True):
        self.origin = time.time()
        super().__init__(Path(run_dir) / TIMELINE_NAME, enabled=enabled and rank == 0, resume_step=resume_step)
        if self.file is not None and resume_step is not None:
            ends = [json.loads(line)["end"] for line in self._lines()]
            self.origin -= max(ends, default=0.0)

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def write(self, step: int, who: str, spans) -> None:
        """`spans`: `(stage, start, end)` with wall-clock start and end (buffered: `flush` writes them out)."""
        self.append_rows(({"step": step, "who": who, "stage": name, "start": round(start - self.origin, 6),
                           "end": round(end - self.origin, 6)} for name, start, end in spans), flush=False)
