"""`medvl-engine report`: the accuracy tables of evaluation runs, alone or side by side.

    medvl-engine report runs/qwen3b                     # one run: every parser mode, mean/std over repeats
    medvl-engine report runs/a runs/b --reference all   # runs side by side, plus MedVLThinker's published rows
    medvl-engine report runs/grpo                       # a training run: curves.png and a table per step

A run folder holds `manifest.json` and one `v{k}/results.jsonl` per repeat (MedVLThinker's
`outputs/greedy/v{0,1,2}` layout). Every number is recomputed from the answers in the jsonl files
(`medvl_engine.evals.metrics`). Side by side, each run is one row (mean over its repeats) in one
parser mode, `regrade` by default (the parser behind MedVLThinker's tables); reference rows come
from `reference_results.json` (MedVLThinker's README tables, with their source) for the models the
runs name or the names given with `--reference`.

A training run folder (`grpo`, `sft`: one holding `metrics.jsonl`) gets its curves instead: reward,
accuracy, format rate, KL, response length, clip fractions, tokens/s and loss over steps, those the run
logged, in one PNG (`curves.png`) next to `report.md`, which holds the same numbers as a table. A GRPO
run's `timeline.jsonl` becomes `timeline.png`: step by step, the learner's stages and each rollout
producer's generation as bars on one clock, with the share of the training time during which the
rollout generated (the overlap that staleness and placement buy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from medvl_engine.config import param
from medvl_engine.evals.manifest import MANIFEST_NAME, read_manifest
from medvl_engine.evals.metrics import MODES, Summary, summarize
from medvl_engine.evals.results import read_records
from medvl_engine.tables import BENCHMARKS, AccuracyTable, DatasetAccuracy, comparison_markdown

logger = logging.getLogger(__name__)

RESULTS_NAME = "results.jsonl"
METRIC_TITLES = {"pass_at_n": "pass@{n}", "majority_at_n": "majority@{n}", "no_parse": "no-parse %"}


def repeat_dirs(folder: str | Path) -> list[Path]:
    """The repeat folders `v0, v1, ...` of an eval run in order (must be contiguous from v0)."""
    folder = Path(folder)
    found = sorted((int(p.name[1:]), p) for p in folder.glob("v*") if p.name[1:].isdigit() and p.is_dir())
    if not found:
        raise FileNotFoundError(f"{folder}: no repeat folders v0, v1, ...; not an eval run folder")
    if [k for k, _ in found] != list(range(len(found))):
        raise ValueError(f"{folder}: repeat folders {[p.name for _, p in found]} are not v0..v{len(found) - 1}")
    return [p for _, p in found]


def load_repeats(folder: str | Path) -> list[list[dict]]:
    """The records of every repeat that has a results file."""
    repeats = []
    for path in repeat_dirs(folder):
        results = path / RESULTS_NAME
        if results.is_file():
            repeats.append(read_records(results))
    if not repeats or not all(repeats):
        raise ValueError(f"{folder}: no finished questions yet")
    return repeats


def model_name(manifest: dict) -> str:
    """The model an eval run folder names: `identity.run.model` (evals.evaluate.sections), or `engine.model`
    in folders written before the settings were grouped that way."""
    identity = manifest.get("identity", {})
    return identity.get("run", {}).get("model", "") or identity.get("engine", {}).get("model", "") or "?"


# --- one run -----------------------------------------------------------------------------------------


def run_markdown(summary: Summary, title: str) -> str:
    """Every parser mode's accuracy (each repeat when several, mean, std), pass@n / majority@n when
    n > 1, the no-parse rate, and the question counts, in MedVLThinker's column order."""
    n, repeats = summary.num_rollouts, len(summary.repeats)
    rows: dict[str, AccuracyTable] = {}
    for mode in summary.modes:
        tables = summary.tables(mode, "accuracy")
        if repeats > 1:
            for k, table in enumerate(tables):
                rows[f"{mode} v{k}"] = table
        rows[f"{mode} mean" if repeats > 1 else mode] = summary.mean(mode)
        if repeats > 1:
            rows[f"{mode} std"] = summary.std(mode)
    for metric in ("pass_at_n", "majority_at_n", "no_parse"):
        for mode in summary.modes:
            table = summary.mean(mode, metric)
            if table is not None:
                rows[f"{METRIC_TITLES[metric].format(n=n)} {mode}"] = table
    lines = [
        f"## {title}",
        "",
        f"Accuracy (%) per benchmark; {repeats} repeat(s), n={n} answer(s) per question. Parser modes: "
        "regrade = the parser behind MedVLThinker's published tables, eval = its offline evaluation, "
        "reward = the strict RL reward (format gate). Avg. = unweighted mean of the benchmarks averaged"
        + (" (std: sample std over repeats)." if repeats > 1 else "."),
        "",
        comparison_markdown(rows, counts=True),
    ]
    return "\n".join(lines) + "\n"


def write_run_report(folder: str | Path) -> tuple[str, dict]:
    """Score a run folder and write `report.md` and `report.json` into it; returns both."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    summary = summarize(load_repeats(folder))
    title = f"{model_name(manifest)} on {manifest.get('identity', {}).get('data', {}).get('source', '?')}"
    markdown = run_markdown(summary, title)
    data = {"run": str(folder), "model": model_name(manifest), **summary.to_dict()}
    (folder / "report.md").write_text(markdown)
    (folder / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    return markdown, data


# --- a training run ----------------------------------------------------------------------------------

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
# (panel title, the metrics.jsonl keys drawn in it): GRPOTrainer.metrics and SFTTrainer.train_step's rows
TRAINING_PANELS = (
    ("reward", ("reward",)),
    ("accuracy", ("accuracy",)),
    ("format rate", ("format",)),
    ("KL to the reference", ("kl",)),
    ("response length (tokens)", ("response_len",)),
    ("clip fraction", ("clip_frac", "dual_clip_frac")),
    ("tokens/s", ("tokens_per_s",)),
    ("loss", ("loss",)),
)
TABLE_ROWS = 50  # a longer run's table shows every k-th step (and the last): the PNG has them all


def is_training_run(folder: str | Path) -> bool:
    """A `grpo`/`sft` run folder: it holds `metrics.jsonl` and is not an eval run."""
    folder = Path(folder)
    return (folder / METRICS_NAME).is_file() and not (folder / MANIFEST_NAME).is_file()


def read_metrics(folder: str | Path) -> list[dict]:
    """The rows of a run's `metrics.jsonl`; SFT rows get `tokens_per_s` from their tokens and seconds."""
    path = Path(folder) / METRICS_NAME
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path}: no steps logged yet")
    for row in rows:
        if "tokens_per_s" not in row and row.get("seconds") and "tokens" in row:
            row["tokens_per_s"] = row["tokens"] / row["seconds"]
    return rows


def _number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def training_panels(rows: list[dict]) -> list[tuple[str, tuple[str, ...]]]:
    """The panels (and within them the keys) for which the run logged at least one finite number."""
    panels = []
    for title, keys in TRAINING_PANELS:
        present = tuple(k for k in keys if any(_number(r.get(k)) is not None for r in rows))
        if present:
            panels.append((title, present))
    return panels


def plot_training(rows: list[dict], path: str | Path, *, title: str = "") -> Path:
    """One PNG, one panel per metric over steps. Drawn with matplotlib's Agg canvas directly: no pyplot,
    no display and no global backend switch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = training_panels(rows)
    if not panels:
        raise ValueError(f"{path}: the run logged none of {[k for _, keys in TRAINING_PANELS for k in keys]}")
    cols = min(4, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4 * cols, 3 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, cols, squeeze=False).ravel()
    for ax, (panel, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], v) for r in rows if (v := _number(r.get(key))) is not None]
            ax.plot(*zip(*points), marker="o" if len(points) < 30 else None, markersize=3, label=key)
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend()
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


def training_markdown(rows: list[dict], title: str) -> str:
    """The plotted metrics per step as a markdown table (every k-th step of a long run, and the last)."""
    keys = [k for _, ks in training_panels(rows) for k in ks]
    every = math.ceil(len(rows) / TABLE_ROWS)
    shown = rows[::every] + ([rows[-1]] if (len(rows) - 1) % every else [])

    def cell(value) -> str:
        number = _number(value)
        return "" if number is None else f"{number:.4g}"

    lines = [f"## {title}", "", f"![curves]({CURVES_NAME})", "",
             f"{len(rows)} steps" + (f"; the table shows one step in {every} and the last." if every > 1 else "."),
             "", "| step | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    lines += ["| " + " | ".join([str(r["step"])] + [cell(r.get(k)) for k in keys]) + " |" for r in shown]
    return "\n".join(lines) + "\n"


def write_training_report(folder: str | Path) -> str:
    """Draw `curves.png` (and `timeline.png` when the run wrote `timeline.jsonl`) and write `report.md` into a
    training run folder; returns the markdown."""
    folder = Path(folder)
    rows = read_metrics(folder)
    title = f"training run {folder.resolve().name}"
    plot_training(rows, folder / CURVES_NAME, title=title)
    markdown = training_markdown(rows, title)
    spans = read_timeline(folder)
    if spans:
        overlap = plot_timeline(spans, folder / TIMELINE_PNG, title=title)
        markdown += "\n" + timeline_markdown(overlap)
    (folder / "report.md").write_text(markdown)
    return markdown


# --- a training run's timeline -----------------------------------------------------------------------

TIMELINE_PNG = "timeline.png"
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
    from medvl_engine.profiling import TIMELINE_NAME

    path = Path(folder) / TIMELINE_NAME
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


# --- reference rows ----------------------------------------------------------------------------------


def load_reference() -> dict:
    """MedVLThinker's published table rows and their source (`reference_results.json`)."""
    text = resources.files("medvl_engine.evals").joinpath("reference_results.json").read_text()
    return json.loads(text)


def _key(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def reference_rows(names: list[str]) -> dict[str, AccuracyTable]:
    """Published rows whose model id, its last path part, or printed label matches one of `names`
    (case-insensitive); `all` takes every row."""
    reference = load_reference()
    by_column = {column: name for name, column in BENCHMARKS}
    wanted = {_key(n) for n in names}
    out = {}
    for row in reference["rows"]:
        keys = {_key(row["model"]), row["label"].lower(), row["model"].lower()}
        if "all" not in wanted and not keys & wanted:
            continue
        columns = tuple(DatasetAccuracy(by_column[c], c, 1, row["values"][c] / 100.0) for c in reference["columns"]
                        if c in by_column)
        table = AccuracyTable(columns=columns, average=row["values"]["Avg."] / 100.0,
                              averaged=tuple(c.dataset_name for c in columns))
        out[f"{row['label']} (published)"] = table
    return out


# --- side by side ------------------------------------------------------------------------------------


@dataclass
class ReportConfig:
    """Which runs, which parser mode and metric, which published rows."""

    runs: list[str] = param(help="run folders written by `medvl-engine eval`, or by `grpo`/`sft` (their curves)",
                            positional=True)
    mode: Literal["regrade", "eval", "reward"] = param("regrade", "parser mode of the compared numbers")
    reference: list[str] = param(factory=list, help="also print MedVLThinker's published rows for these model names "
                                 "(`all`: every row)")
    no_reference: bool = param(False, "do not add the published rows of the models the runs name")

    def __post_init__(self):
        if not self.runs:
            raise ValueError("report: give at least one run folder")
        if self.mode not in MODES:
            raise ValueError(f"report: --mode {self.mode!r} is not one of {MODES}")


def compare(cfg: ReportConfig) -> str:
    """One row per run (mean over its repeats, in `cfg.mode`) plus the matching published rows."""
    rows: dict[str, AccuracyTable] = {}
    models = []
    for folder in cfg.runs:
        manifest = read_manifest(folder)
        summary = summarize(load_repeats(folder), modes=(cfg.mode,))
        models.append(model_name(manifest))
        label = f"{Path(folder).name} ({model_name(manifest).rstrip('/').rsplit('/', 1)[-1]}, "
        label += f"{len(summary.repeats)} run{'s' if len(summary.repeats) > 1 else ''})"
        rows[label] = summary.mean(cfg.mode)
    names = list(cfg.reference) + ([] if cfg.no_reference else models)
    rows.update(reference_rows(names))
    return (f"Accuracy (%), parser mode `{cfg.mode}`, mean over each run's repeats; published rows: "
            f"MedVLThinker README (regrade parser, mean of 3 greedy runs).\n\n"
            + comparison_markdown(rows) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config as config_lib

    config_lib.add_arguments(parser, ReportConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config as config_lib

    cfg = config_lib.from_args(ReportConfig, args)
    evals = [run for run in cfg.runs if not is_training_run(run)]
    for run in cfg.runs:
        if is_training_run(run):
            print(write_training_report(run))
            drawn = [CURVES_NAME] + ([TIMELINE_PNG] if read_timeline(run) else [])
            logger.info("wrote %s and %s", Path(run) / "report.md",
                        " and ".join(str(Path(run) / name) for name in drawn))
    if len(evals) == 1:
        markdown, _ = write_run_report(evals[0])
        print(markdown)
    if evals:
        print(compare(dataclasses.replace(cfg, runs=evals)))
    return 0
