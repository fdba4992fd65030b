"""A GRPO run's `timeline.jsonl` as `timeline.png`: step by step, the learner's stages and each rollout
producer's generation as bars on one clock, with the share of the training time during which the rollout
generated (the overlap that staleness and placement buy). `medvl-engine report` draws it for a training run
(`medvl_engine.evals.curves.write_training_report`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from medvl_engine import run_folder

TIMELINE_PNG = run_folder.TIMELINE_PNG
# The learner's stages (GRPOTrainer.step), in the order a step runs them, with their colours.
LEARNER_STAGES = {"rollout_wait": "tab:gray", "collate": "tab:olive", "logprobs": "tab:purple", "update": "tab:blue",
                  "weight_sync": "tab:red"}
# The stages that are training: the overlap is the share of their time during which a rollout generated.
TRAINING_STAGES = ("collate", "logprobs", "update")
GENERATION_COLOR = "tab:green"
OVERLAP_COLOR = "black"
STEP_LABELS = 40  # a longer run labels every k-th step (and annotates no per-step overlap)


def read_timeline(folder: str | Path) -> list[dict]:
    """The spans of a run's `timeline.jsonl` (empty when it wrote none); a span ending before it starts is an error."""
    path = Path(folder) / run_folder.TIMELINE
    if not path.is_file():
        return []
    spans = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for span in spans:
        if not span["start"] <= span["end"]:
            raise ValueError(f"{path}: step {span['step']} {span['who']} {span['stage']} ends before it starts")
    return spans


def merge_intervals(intervals) -> list[tuple[float, float]]:
    """The union of `(start, end)` intervals as sorted, disjoint intervals."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def intersect_intervals(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> list:
    """The parts of the disjoint, sorted `intervals` that lie inside the disjoint, sorted `cover`."""
    out, k = [], 0
    for start, end in intervals:
        while k < len(cover) and cover[k][1] <= start:
            k += 1
        j = k
        while j < len(cover) and cover[j][0] < end:
            out.append((max(start, cover[j][0]), min(end, cover[j][1])))
            j += 1
    return out


def covered_seconds(intervals: list[tuple[float, float]], cover: list[tuple[float, float]]) -> float:
    """How much of the disjoint, sorted `intervals` lies inside the disjoint, sorted `cover`."""
    return sum(end - start for start, end in intersect_intervals(intervals, cover))


@dataclass
class TimelineOverlap:
    """Training seconds of the learner, and how many of them a rollout producer was generating in."""

    train_s: float
    overlap_s: float
    generate_s: float
    per_step: dict[int, float]  # step -> overlap fraction of its training time
    intervals: list[tuple[float, float]]  # where training and generation ran at once

    @property
    def fraction(self) -> float:
        return self.overlap_s / self.train_s if self.train_s else 0.0


def timeline_overlap(spans: list[dict]) -> TimelineOverlap:
    generating = merge_intervals((s["start"], s["end"]) for s in spans if s["who"] != "learner")
    training = [s for s in spans if s["who"] == "learner" and s["stage"] in TRAINING_STAGES]
    per_step: dict[int, list] = {}
    for s in training:
        per_step.setdefault(s["step"], []).append((s["start"], s["end"]))
    fractions = {}
    for step, intervals in per_step.items():
        merged = merge_intervals(intervals)
        seconds = sum(end - start for start, end in merged)
        fractions[step] = covered_seconds(merged, generating) / seconds if seconds else 0.0
    train = merge_intervals((s["start"], s["end"]) for s in training)
    both = intersect_intervals(train, generating)
    return TimelineOverlap(train_s=sum(end - start for start, end in train),
                           overlap_s=sum(end - start for start, end in both),
                           generate_s=sum(end - start for start, end in generating), per_step=fractions,
                           intervals=both)


def plot_timeline(spans: list[dict], path: str | Path, *, title: str = "") -> TimelineOverlap:
    """One PNG: a lane per producer of spans (the learner's stages on top, then each rollout producer's
    generation, one translucent bar per group: darker where groups ran at once), step boundaries marked,
    and the overlap of generation with training annotated. Returns the overlap."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    overlap = timeline_overlap(spans)
    producers = sorted({s["who"] for s in spans if s["who"] != "learner"})
    lanes = ["learner", *producers]
    fig = Figure(figsize=(14, 1.8 + 0.7 * len(lanes)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    height = 0.6
    for lane, who in enumerate(lanes):
        y = len(lanes) - 1 - lane
        mine = [s for s in spans if s["who"] == who]
        if who == "learner":
            for name, color in LEARNER_STAGES.items():
                bars = [(s["start"], s["end"] - s["start"]) for s in mine if s["stage"] == name]
                if bars:
                    ax.broken_barh(bars, (y - height / 2, height), facecolors=color)
            others = [(s["start"], s["end"] - s["start"]) for s in mine if s["stage"] not in LEARNER_STAGES]
            if others:
                ax.broken_barh(others, (y - height / 2, height), facecolors="tab:brown")
            # Under the learner's bars: where it trained while a rollout generated.
            ax.broken_barh([(a, b - a) for a, b in overlap.intervals], (y - height / 2 - 0.14, 0.1),
                           facecolors=OVERLAP_COLOR)
        else:
            ax.broken_barh([(s["start"], s["end"] - s["start"]) for s in mine], (y - height / 2, height),
                           facecolors=GENERATION_COLOR, alpha=0.35, linewidth=0)
    ax.set_yticks(range(len(lanes)), [who if who == "learner" else _count(sum(s["who"] == who for s in spans), who)
                                      for who in reversed(lanes)])
    steps = sorted({s["step"] for s in spans if s["who"] == "learner"})
    every = math.ceil(len(steps) / STEP_LABELS) if steps else 1
    top = len(lanes) - 1 + height / 2
    for i, step in enumerate(steps):
        begin = min(s["start"] for s in spans if s["who"] == "learner" and s["step"] == step)
        ax.axvline(begin, color="black", linewidth=0.6, linestyle=":", alpha=0.6)
        if i % every == 0:
            label = f"{step}" if every > 1 or step not in overlap.per_step else \
                f"{step}: {overlap.per_step[step]:.0%}"
            ax.text(begin, top + 0.08, label, fontsize=7, va="bottom", clip_on=True)
    ax.set_ylim(-0.6, len(lanes) - 0.1)
    _skip_startup(ax, spans, y=len(lanes) - 1)
    ax.set_xlabel("seconds since the run started")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=name) for name, c in LEARNER_STAGES.items()]
    handles.append(Patch(color=GENERATION_COLOR, alpha=0.5, label="generate (one bar per group)"))
    handles.append(Patch(color=OVERLAP_COLOR, label="training while generating"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    heading = (f"generation ran during {overlap.fraction:.0%} of the learner's training time "
               f"({overlap.overlap_s:.1f} of {overlap.train_s:.1f} s; step labels: step: its share)")
    fig.suptitle(f"{title}: timeline\n{heading}" if title else heading, fontsize=10)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return overlap


def _skip_startup(ax, spans: list[dict], *, y: float) -> None:
    """A first step that waited most of the run for its groups (rollout workers loading the model) would
    squeeze every other step into the picture's edge: the axis then starts shortly before that wait ends,
    and the lane says how long it was."""
    waits = [s for s in spans if s["who"] == "learner" and s["stage"] == "rollout_wait"]
    end = max(s["end"] for s in spans)
    if len(waits) < 2 or waits[0]["end"] - waits[0]["start"] < 0.5 * end:
        return
    first = waits[0]
    rest = end - first["end"]
    later = [s["start"] for s in spans if s is not first and s["start"] > first["start"]]
    left = min([first["end"] - 0.1 * rest, *later])
    ax.set_xlim(left - 0.02 * rest, end + 0.02 * rest)
    ax.text(left - 0.015 * rest, y, f"step {first['step']} waited {first['end'] - first['start']:.1f} s for its "
            "first groups", fontsize=7, va="center", color="white", clip_on=True)


def _count(groups: int, who: str) -> str:
    return f"{who} ({groups} group{'' if groups == 1 else 's'})"


def timeline_markdown(overlap: TimelineOverlap) -> str:
    return (f"![timeline]({TIMELINE_PNG})\n\nGeneration ran during {overlap.fraction:.0%} of the learner's training "
            f"time ({overlap.overlap_s:.2f} of {overlap.train_s:.2f} s; {', '.join(TRAINING_STAGES)}); the rollout "
            f"generated for {overlap.generate_s:.2f} s in all.\n")
