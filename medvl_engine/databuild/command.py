"""`medvl-engine build-data STAGE`: PubMedVision's data pipeline, one stage at a time or `all` in order.

    medvl-engine build-data filter-text --input.source pmc_oa.jsonl --output runs/text
    medvl-engine build-data filter-image --input.source runs/text/kept.jsonl --output runs/image
    medvl-engine build-data dedup --input.source runs/image/kept.jsonl --output runs/dedup
    medvl-engine build-data reformat --input.source runs/dedup/kept.jsonl --output runs/vqa \
        --reformat.model Qwen/Qwen2.5-VL-7B-Instruct --rollout.backend sglang
    medvl-engine build-data all --config build.yaml        # every stage, one subfolder each

Each stage reads image-caption rows (`--input.*`), streams them in order, and writes into its folder
`kept.jsonl` (the next stage's input) and `dropped.jsonl` (id, reason, detail per row), or for
reformat `sft.jsonl`, `llava.json` and `failed.jsonl`; plus `manifest.json`, `state.json` (the last
checkpoint) and `summary.md` / `summary.json` (kept and dropped by reason, and the stage's own
figures). Started again on the same folder with the same settings, a stage resumes at its last
checkpoint and ends with the same files as an uninterrupted run; a finished stage just reports.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medvl_engine import config as config_lib
from medvl_engine.databuild.config import STAGES, BuildDataConfig, InputConfig

logger = logging.getLogger(__name__)


def stage_input(cfg: BuildDataConfig, stage: str) -> InputConfig:
    """What `stage` reads: the configured input for the first stage run, else the previous stage's kept rows."""
    if cfg.stage != "all" or stage == STAGES[0]:
        return cfg.input
    previous = STAGES[STAGES.index(stage) - 1]
    return InputConfig(source=str(Path(cfg.output) / previous / "kept.jsonl"))


def run_one(cfg: BuildDataConfig, stage: str, *, encoder=None, backends=None, renderer=None) -> tuple[dict, str]:
    """Run (or resume) one stage; returns its summary and the markdown of it."""
    from medvl_engine.databuild.stage import run_stage

    folder = Path(cfg.output) / stage if cfg.stage == "all" else Path(cfg.output)
    source = stage_input(cfg, stage)
    overwrite = cfg.overwrite and cfg.stage != "all"  # `all` clears the whole folder once, in build_data
    if stage == "reformat":
        from medvl_engine.databuild.reformat import reformat

        summary = reformat(cfg, folder, source, backends=backends, renderer=renderer)
    else:
        if stage == "filter-text":
            from medvl_engine.databuild.filter_text import TextFilter

            filt = TextFilter(cfg.text)
        elif stage == "filter-image":
            from medvl_engine.databuild.filter_image import ImageFilter

            filt = ImageFilter(cfg.image)
        else:
            from medvl_engine.databuild.dedup import DedupFilter

            filt = DedupFilter(cfg.dedup, encoder=encoder)
        summary = run_stage(filt, folder, source, checkpoint_rows=cfg.checkpoint_rows, overwrite=overwrite,
                            show_progress=cfg.progress)
    return summary, (folder / "summary.md").read_text()


def build_data(cfg: BuildDataConfig, **kwargs) -> list[tuple[dict, str]]:
    """Run `cfg.stage`, or every stage in order for `all`; returns each stage's summary and markdown."""
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    if cfg.stage == "all" and cfg.overwrite and Path(cfg.output).exists():
        import shutil

        shutil.rmtree(cfg.output)
    return [run_one(cfg, stage, **kwargs) for stage in stages]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_lib.add_arguments(parser, BuildDataConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_lib.from_args(BuildDataConfig, args)
    for _, text in build_data(cfg):
        print(text)
    logger.info("outputs in %s", cfg.output)
    return 0
