"""The Python API: scoring, evaluation, pass-rate estimation and curation as plain functions (notebooks, scripts).

    from medvl_engine import score, evaluate, passrate, curate

    score(["<think>...</think>\\n<answer> B </answer>"], ["No"], ["B"]).reward      # array([1.], dtype=float32)
    run = evaluate(model="smollm2", output="runs/eval-smollm2",
                   data={"source": "bundled", "ignore_images": True}, rollout={"max_response_tokens": 256})
    run.report                                                    # the accuracy table as markdown
    counts = passrate(model="smollm2", output="runs/pr", data={"source": "bundled", "max_samples": 8})
    kept = curate(source="bundled", pass_counts="runs/pr", output="data/curated", max_pass=16)

Each function takes either the command's config dataclass (`EvalConfig`, `PassrateConfig`, `CurateConfig`)
or its fields as keyword arguments (sections as dicts, e.g. `rollout={"n": 4}`), or both (the keywords
override the config's values); the config is checked exactly as on the command line. They run the same
code as `medvl-engine eval | passrate | curate`, write the same run folders, and also work inside a running
event loop (a Jupyter cell): the generation then runs on a fresh event loop in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from medvl_engine import config as config_lib
from medvl_engine.rewards import ScoreResult, score

__all__ = ["EvalRun", "PassrateRun", "ScoreResult", "curate", "evaluate", "passrate", "score"]

T = TypeVar("T")


def _config(cls: type[T], cfg: T | None, settings: dict[str, Any]) -> T:
    """`cfg` (or the defaults of `cls`) with `settings` on top, checked by every `__post_init__`."""
    if cfg is not None and not isinstance(cfg, cls):
        raise TypeError(f"expected a {cls.__name__}, got {type(cfg).__name__}")
    base = config_lib.to_dict(cfg, switches=True) if cfg is not None else {}
    return config_lib.build(cls, config_lib.merge(base, settings), where=cls.__name__)


@dataclass(frozen=True)
class EvalRun:
    """A finished evaluation: its run folder, each repeat's stats (`RunStats`) and the report as markdown."""

    output: Path
    stats: list
    report: str

    def _repr_markdown_(self) -> str:
        return self.report


@dataclass(frozen=True)
class PassrateRun:
    """A finished pass-rate estimate: its run folder, stats, the histogram as text and the pass counts."""

    output: Path
    stats: Any
    histogram: str
    pass_counts: dict[int, int]  # dataset_index -> correct samples
    num_samples: int             # samples per question (rollout.n)

    def _repr_markdown_(self) -> str:
        return self.histogram


def evaluate(cfg=None, /, *, backends=None, renderer=None, **settings) -> EvalRun:
    """Evaluate a model on medical VQA benchmarks (MedVLThinker-Eval by default: greedy, 4096 new tokens,
    seed 42), as `medvl-engine eval` does; returns the run folder, the stats and the markdown report.

    `cfg` is an `EvalConfig`; keyword settings are its fields (`model`, `output`, `repeats`, `overwrite`,
    `data={...}`, `rollout={...}`) and override it. `model` and `output` are required. A run folder that
    holds this run is resumed. `backends` and `renderer` (the tokenizer or processor that renders prompts)
    may be given to reuse an engine already loaded; backends built here are shut down at the end.
    """
    from medvl_engine.evals.evaluate import EvalConfig
    from medvl_engine.evals.evaluate import evaluate as run_eval

    cfg = _config(EvalConfig, cfg, settings)
    stats, markdown = run_eval(cfg, backends=backends, renderer=renderer)
    return EvalRun(Path(cfg.output), stats, markdown)


def passrate(cfg=None, /, *, backends=None, renderer=None, **settings) -> PassrateRun:
    """Estimate per-question pass counts (MedVLThinker's defaults: 16 samples at temperature 1.0, 4096 new
    tokens, seed 42, on m23k's training split), as `medvl-engine passrate` does.

    `cfg` is a `PassrateConfig`; keyword settings are its fields (`model`, `output`, `overwrite`,
    `data={...}`, `rollout={...}`) and override it. Returns the run folder, the stats, the histogram table
    and `pass_counts` (dataset_index -> correct samples of `num_samples`); `curate` reads the folder.
    """
    from medvl_engine.evals.curate import read_pass_counts
    from medvl_engine.evals.passrate import PassrateConfig, estimate

    cfg = _config(PassrateConfig, cfg, settings)
    stats, text = estimate(cfg, backends=backends, renderer=renderer)
    counts, num_samples = read_pass_counts(cfg.output)
    return PassrateRun(Path(cfg.output), stats, text, counts, num_samples)


def curate(cfg=None, /, **settings):
    """Keep the questions of medium difficulty and order them (MedVLThinker: pass counts 1..7 of 16, easy to
    hard), as `medvl-engine curate` does; writes OUTPUT/dataset, OUTPUT/data.parquet and OUTPUT/curation.json.

    `cfg` is a `CurateConfig`; keyword settings are its fields (`source`, `split`, `pass_counts` (a pass-rate
    run folder), `output`, `min_pass`, `max_pass`, `order`, `seed`, `overwrite`) and override it. Returns the
    `Curation`: the kept rows in order, their pass counts and how many were dropped at each end or missing.
    """
    from medvl_engine.evals.curate import CurateConfig
    from medvl_engine.evals.curate import curate as run_curate

    return run_curate(_config(CurateConfig, cfg, settings))
