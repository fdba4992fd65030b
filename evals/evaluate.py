"""`medvl-engine eval`: MedVLThinker's benchmark evaluation on the rollout pool, resumable, with its tables.

    medvl-engine eval --model UCSC-VLAA/MedVLThinker-7B-RL_m23k --output runs/7b-rl --repeats 3
    medvl-engine eval --model smollm2 --source bundled --ignore-images --max-new-tokens 256 --output runs/demo

Defaults are MedVLThinker's evaluation settings: `UCSC-VLAA/MedVLThinker-Eval` (split test), greedy
decoding (temperature 0, top_p 1, n 1), 4096 new tokens, seed 42; `--repeats 3` runs three independent
repeats as the paper does (with sampling, repeat k uses seed + k). The run folder holds

    manifest.json          model, settings, versions, commit (one entry per attempt)
    v{k}/results.jsonl     one line per question in MedVLThinker's layout, appended as questions finish
    report.md, report.json accuracy per benchmark in the paper's column order, every parser mode

A stopped run resumes where it stopped when started again with the same settings: finished
`dataset_index` values are skipped and nothing is written twice.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medvl_engine.config import param
from medvl_engine.evals.runner import DecodingConfig, EngineConfig, QuestionsConfig, RunStats

VOLATILE = ("engine.device", "engine.max_batch", "run.output", "run.overwrite", "run.repeats")


def sections(cfg) -> dict:
    """The settings grouped by component (`data`, `engine`, `decoding`, `run`) for the manifest."""
    groups = {"data": QuestionsConfig, "engine": EngineConfig, "decoding": DecodingConfig}
    values = asdict(cfg)
    out = {name: {f.name: values[f.name] for f in fields(cls)} for name, cls in groups.items()}
    taken = {key for group in out.values() for key in group}
    out["run"] = {k: v for k, v in values.items() if k not in taken}
    return out


@dataclass
class EvalConfig(DecodingConfig, EngineConfig, QuestionsConfig):
    """An evaluation run: questions, engine and decoding (MedVLThinker's defaults), repeats, output folder."""

    output: str = param("", "run folder (created, or resumed when it holds this run)")
    repeats: int = param(1, "independent repeats (MedVLThinker's tables: 3)")
    overwrite: bool = param(False, "delete the run folder first instead of resuming it")

    def __post_init__(self):
        QuestionsConfig.__post_init__(self)
        EngineConfig.__post_init__(self)
        DecodingConfig.__post_init__(self)
        if not self.output:
            raise ValueError("--output: is required (the run folder)")
        if self.repeats < 1:
            raise ValueError(f"--repeats: must be >= 1, got {self.repeats}")


async def _generate_repeats(cfg: EvalConfig, questions, backends, renderer) -> list[RunStats]:
    from medvl_engine.evals.results import ResultsFile
    from medvl_engine.evals.runner import generate_into

    out = []
    for k in range(cfg.repeats):
        results = ResultsFile(Path(cfg.output) / f"v{k}" / "results.jsonl")
        stats = await generate_into(results, questions, backends, renderer, cfg.params(seed_offset=k),
                                    mode="eval", label=f"eval v{k}: ")
        out.append(stats)
    return out


def evaluate(cfg: EvalConfig, *, backends=None, renderer=None) -> tuple[list[RunStats], str]:
    """Run (or resume) the evaluation and write its report; returns each repeat's stats and the markdown.

    `backends` and `renderer` (the tokenizer or processor that renders prompts) may be given instead of
    being built from `cfg.model`; backends built here are shut down at the end.
    """
    from medvl_engine.evals.manifest import open_run
    from medvl_engine.evals.report import write_run_report
    from medvl_engine.evals.runner import build_backends, load_questions, shutdown

    questions = load_questions(cfg)
    open_run(cfg.output, "eval", sections(cfg), volatile=VOLATILE, overwrite=cfg.overwrite)
    owned = backends is None
    if owned:
        backends, renderer = build_backends(cfg)

    async def run():
        try:
            return await _generate_repeats(cfg, questions, backends, renderer)
        finally:
            if owned:
                await shutdown(backends)

    stats = asyncio.run(run())
    markdown, _ = write_run_report(cfg.output)
    return stats, markdown


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config

    config.add_arguments(parser, EvalConfig)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config

    cfg = config.from_args(EvalConfig, args)
    stats, markdown = evaluate(cfg)
    print(markdown)
    for k, s in enumerate(stats):
        print(f"v{k}: {s.written} answered, {s.skipped} already done, {len(s.failed)} failed; "
              f"{s.questions_per_s:.2f} questions/s, {s.tokens_per_s:.0f} generated tokens/s", file=sys.stderr)
        for index, reason in s.failed[:10]:
            print(f"  dataset_index {index} failed: {reason}", file=sys.stderr)
    if any(s.failed for s in stats):
        print("some questions failed; run the same command again to retry them (finished ones are kept)",
              file=sys.stderr)
        return 1
    return 0
