"""`medvl-engine passrate`: how many of n sampled answers solve each question (MedVLThinker's pass counts).

    medvl-engine passrate --model Qwen/Qwen2.5-VL-3B-Instruct \
        --data.source UCSC-VLAA/MedVLThinker-m23k-tokenized --output runs/passrate-m23k-3b

Its flags are `PassrateConfig`'s (the same `data` and `rollout` sections as every other command), with
MedVLThinker's settings as defaults: n=16 samples per question at temperature 1.0 (top_p 1), 4096 new
tokens, seed 42, graded like MedVLThinker's pass counts (its offline-eval grader, `eval` mode: the first
`<answer>` block, or the whole answer, no format gate), over a training split in dataset order. The run folder holds

    manifest.json        model, settings, versions, commit
    results.jsonl        one line per question (the eval layout); `num_correct` is its pass count
    histogram.png        questions per pass count 0..n (matplotlib, Agg)
    histogram.txt        the same as a text table (also printed)

Bulk work: the pool keeps every backend saturated (questions in flight, no batch barrier) and each
question is one request with n samples (the engine shares the prompt across them). Resumable like
`medvl-engine eval`. `medvl-engine curate` reads the folder.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvl_engine import config as config_lib
from medvl_engine import run_folder
from medvl_engine.config import param
from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.evals.evaluate import check_generation_config, run_generation_command
from medvl_engine.evals.runner import RunStats
from medvl_engine.rollout.config import DataConfig, RolloutConfig

logger = logging.getLogger(__name__)

RESULTS_NAME = run_folder.RESULTS
# As eval's: `rollout.max_batch` is part of an hf run's identity (seeded samples depend on batch padding too).
VOLATILE = ("rollout.device", "rollout.max_in_flight", "rollout.threads", "run.output", "run.overwrite")


def passrate_data() -> DataConfig:
    return DataConfig(source="UCSC-VLAA/MedVLThinker-m23k-tokenized", split="train", shuffle=False)


def passrate_rollout() -> RolloutConfig:
    return RolloutConfig(n=16, temperature=1.0, top_p=1.0, max_response_tokens=4096, seed=42, engine_seed=42)


@dataclass
class PassrateConfig:
    """A pass-rate run: MedVLThinker's estimate_pass_rate settings by default."""

    model: str = param("", "model folder (Hugging Face layout) or `smollm2` for the embedded default")
    output: str = param("", "run folder (created, or resumed when it holds this run)")
    overwrite: bool = param(False, "replace an earlier passrate run in the output folder instead of resuming it "
                            "(only a folder medvl-engine wrote; never one holding the model or data)")
    data: DataConfig = field(default_factory=passrate_data)
    rollout: RolloutConfig = field(default_factory=passrate_rollout)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("model: is required (a model folder, or `smollm2`)")
        if not self.output:
            raise ConfigError("output: is required (the run folder)")
        self.rollout.require_sampling("pass counts need n different samples per question")
        check_generation_config(self)


def histogram(pass_counts, n: int) -> np.ndarray:
    """Questions per pass count 0..n."""
    counts = np.asarray(list(pass_counts), dtype=np.int64)
    if counts.size and (counts.min() < 0 or counts.max() > n):
        raise ValueError(f"pass counts must lie in 0..{n}, got {counts.min()}..{counts.max()}")
    return np.bincount(counts, minlength=n + 1)


def histogram_text(hist: np.ndarray, *, width: int = 40) -> str:
    """A text table: pass count, questions, share, and a bar scaled to the largest bucket."""
    total = int(hist.sum())
    top = max(int(hist.max()), 1)
    n = len(hist) - 1
    lines = [f"| pass count (of {n}) | questions | share % | |", "|---:|---:|---:|:---|"]
    for k, count in enumerate(hist.tolist()):
        share = 100.0 * count / total if total else 0.0
        lines.append(f"| {k} | {count} | {share:.1f} | {'#' * round(width * count / top)} |")
    solved_any = int(hist[1:].sum())
    mean = float((np.arange(n + 1) * hist).sum() / (n * total)) if total else 0.0
    solved_share = 100 * solved_any / max(total, 1)
    lines += ["", f"{total} questions; mean pass rate {100 * mean:.1f}%; pass@{n} {solved_share:.1f}%; "
              f"none solved {int(hist[0])}; all solved {int(hist[n])}"]
    return "\n".join(lines) + "\n"


def plot_histogram(hist: np.ndarray, path: str | Path, title: str) -> Path:
    """Bar chart of questions per pass count, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.bar(np.arange(len(hist)), hist, color="#3b6ea5")
        ax.set_xticks(np.arange(len(hist)))
        ax.set_xlabel(f"pass count (correct answers of {len(hist) - 1})")
        ax.set_ylabel("questions")
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return Path(path)


def write_histogram(folder: str | Path, title: str = "") -> tuple[np.ndarray, str]:
    """Histogram of a pass-rate run folder as histogram.png and histogram.txt; returns it and the text."""
    from medvl_engine.evals.results import iter_pass_counts

    folder = Path(folder)
    rows = list(iter_pass_counts(folder / RESULTS_NAME))
    sizes = {n for _, _, n in rows}
    if len(sizes) != 1:
        raise RunFolderError(f"{folder}: records come from different sample counts {sorted(sizes)}")
    hist = histogram((c for _, c, _ in rows), sizes.pop())
    text = histogram_text(hist)
    (folder / run_folder.HISTOGRAM_TXT).write_text(text)
    plot_histogram(hist, folder / run_folder.HISTOGRAM_PNG, title or folder.name)
    return hist, text


def estimate(cfg: PassrateConfig, *, backends=None, renderer=None) -> tuple[RunStats, str]:
    """Run (or resume) the pass-rate estimate and write its histogram; returns the stats and the text table."""
    from medvl_engine.evals.results import ResultsFile
    from medvl_engine.evals.runner import generate_into

    results = Path(cfg.output) / RESULTS_NAME
    title = f"{Path(cfg.model).name}: pass counts on {Path(cfg.data.source).name}"

    async def generate(questions, backends, renderer) -> RunStats:
        return await generate_into(ResultsFile(results), questions, backends, renderer, cfg.rollout, mode="eval",
                                   label="passrate")

    return run_generation_command(cfg, "passrate", VOLATILE, generate, lambda: [results],
                                  lambda: write_histogram(cfg.output, title)[1], backends=backends, renderer=renderer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_lib.add_arguments(parser, PassrateConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_lib.from_args(PassrateConfig, args)
    stats, text = estimate(cfg)
    print(text)
    logger.info("%d answered, %d already done, %d failed; %.2f questions/s, %.0f generated tokens/s", stats.written,
                stats.skipped, len(stats.failed), stats.questions_per_s, stats.tokens_per_s)
    if stats.failed:
        for index, reason in stats.failed[:10]:
            logger.error("dataset_index %s failed: %s", index, reason)
        logger.error("some questions failed; run the same command again to retry them")
        return 1
    return 0
