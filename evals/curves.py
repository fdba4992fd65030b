"""A training run's curves (`grpo`, `sft`: a folder holding `metrics.jsonl`): reward, accuracy, format rate, KL,
response length, clip fractions, tokens/s and loss over steps, those the run logged, in one PNG (`curves.png`)
next to `report.md`, which holds the same numbers as a table; a GRPO run's `timeline.jsonl` adds `timeline.png`
(`medvl_engine.evals.timeline`). `medvl-engine report` writes them for a training run folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medvl_engine import run_folder
from medvl_engine.errors import RunFolderError
from medvl_engine.evals.manifest import MANIFEST_NAME
from medvl_engine.evals.timeline import TIMELINE_PNG, plot_timeline, read_timeline, timeline_markdown

METRICS_NAME = run_folder.METRICS
CURVES_NAME = run_folder.CURVES_PNG
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
        raise RunFolderError(f"{path}: no steps logged yet")
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
        raise RunFolderError(f"{path}: the run logged none of {[k for _, keys in TRAINING_PANELS for k in keys]}")
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
    (folder / run_folder.REPORT_MD).write_text(markdown)
    return markdown
