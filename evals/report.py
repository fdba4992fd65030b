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
rollout generated (the overlap that staleness and placement buy). The curves are drawn by
`medvl_engine.evals.curves`, the timeline by `medvl_engine.evals.timeline`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from medvl_engine import run_folder
from medvl_engine.config import param
from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.evals.curves import CURVES_NAME, is_training_run, write_training_report
from medvl_engine.evals.manifest import read_manifest
from medvl_engine.evals.metrics import MODES, Summary, summarize
from medvl_engine.evals.results import read_records
from medvl_engine.evals.timeline import TIMELINE_PNG, read_timeline
from medvl_engine.tables import BENCHMARKS, AccuracyTable, DatasetAccuracy, comparison_markdown

logger = logging.getLogger(__name__)

RESULTS_NAME = run_folder.RESULTS
METRIC_TITLES = {"pass_at_n": "pass@{n}", "majority_at_n": "majority@{n}", "no_parse": "no-parse %"}


def repeat_dirs(folder: str | Path) -> list[Path]:
    """The repeat folders `v0, v1, ...` of an eval run in order (must be contiguous from v0)."""
    folder = Path(folder)
    found = sorted((int(p.name[1:]), p) for p in folder.glob("v*") if p.name[1:].isdigit() and p.is_dir())
    if not found:
        raise RunFolderError(f"{folder}: no repeat folders v0, v1, ...; not an eval run folder")
    if [k for k, _ in found] != list(range(len(found))):
        raise RunFolderError(f"{folder}: repeat folders {[p.name for _, p in found]} are not v0..v{len(found) - 1}")
    return [p for _, p in found]


def load_repeats(folder: str | Path) -> list[list[dict]]:
    """The records of every repeat that has a results file."""
    repeats = []
    for path in repeat_dirs(folder):
        results = path / RESULTS_NAME
        if results.is_file():
            repeats.append(read_records(results))
    if not repeats or not all(repeats):
        raise RunFolderError(f"{folder}: no finished questions yet")
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
    (folder / run_folder.REPORT_MD).write_text(markdown)
    (folder / run_folder.REPORT_JSON).write_text(json.dumps(data, indent=2) + "\n")
    return markdown, data


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
            raise ConfigError("report: give at least one run folder")
        if self.mode not in MODES:
            raise ConfigError(f"report: --mode {self.mode!r} is not one of {MODES}")


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
            logger.info("wrote %s and %s", Path(run) / run_folder.REPORT_MD,
                        " and ".join(str(Path(run) / name) for name in drawn))
    if len(evals) == 1:
        markdown, _ = write_run_report(evals[0])
        print(markdown)
    if evals:
        print(compare(dataclasses.replace(cfg, runs=evals)))
    return 0
