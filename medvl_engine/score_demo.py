"""`medvl-engine score-demo`: the bundled model answers scored in all three grading modes.

It scores the bundled model answers (`medvl_engine/data/bundled/answers.jsonl`: correct, wrong
and malformed responses) against the bundled questions in MedVLThinker's three grading modes and
prints the accuracy tables side by side, so the difference between the strict RL reward and the
looser published-table rule is visible on one screen.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

from medvl_engine.config import param
from medvl_engine.data import bundled_answers_path, load_bundled
from medvl_engine.errors import ConfigError
from medvl_engine.rewards import MODES
from medvl_engine.scoring import read_answers, score_answers, summary_line, write_jsonl
from medvl_engine.tables import comparison_markdown

logger = logging.getLogger(__name__)


@dataclass
class ScoreDemoConfig:
    """The bundled answers scored in every grading mode."""

    output: str = param("", "write the answers scored in regrade mode to this jsonl")
    threads: int = param(0, "scoring threads (0: every core)")

    def __post_init__(self):
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medvl_engine import config as config_lib

    config_lib.add_arguments(parser, ScoreDemoConfig, config_flag=False)


def main(args: argparse.Namespace) -> int:
    from medvl_engine import config as config_lib

    args = config_lib.from_args(ScoreDemoConfig, args)
    samples = load_bundled()
    records = read_answers(bundled_answers_path())
    runs = {mode: score_answers(records, samples, mode=mode, threads=args.threads or None) for mode in MODES}
    print(summary_line(runs["regrade"], samples.name, modes="modes: " + ", ".join(MODES)))
    print(comparison_markdown({mode: run.table for mode, run in runs.items()}, counts=True))
    formatted = sum(row["format_ok"] for row in runs["reward"].rows)
    print(f"{formatted} of {len(records)} responses pass the reward's format gate "
          "<think>...</think> <answer>...</answer>")
    if args.output:
        logger.info("wrote %s", write_jsonl(args.output, runs["regrade"].rows))
    return 0
