"""`medvl-engine eval`: MedVLThinker's benchmark evaluation on the rollout pool, resumable, with its tables.

    medvl-engine eval --model UCSC-VLAA/MedVLThinker-7B-RL_m23k --output runs/7b-rl --repeats 3
    medvl-engine eval --model smollm2 --data.source bundled --data.ignore-images \
        --rollout.max-response-tokens 256 --output runs/demo

Its flags are `EvalConfig`'s: the same `data` and `rollout` sections as every other command, with
MedVLThinker's evaluation settings as defaults: `UCSC-VLAA/MedVLThinker-Eval` (split test, dataset
order), greedy decoding (temperature 0, top_p 1, n 1), 4096 new tokens, seed 42; `--repeats 3` runs
three independent repeats as the paper does (with sampling, repeat k seeds with seed + k). The run
folder holds

    manifest.json          model, settings, versions, commit (one entry per attempt)
    v{k}/results.jsonl     one line per question in MedVLThinker's layout, appended as questions finish
    report.md, report.json accuracy per benchmark in the paper's column order, every parser mode

A stopped run resumes where it stopped when started again with the same settings: finished
`dataset_index` values are skipped and nothing is written twice.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

from medvl_engine import config as config_lib
from medvl_engine import run_folder
from medvl_engine.config import param
from medvl_engine.errors import ConfigError, RunFolderError
from medvl_engine.evals.runner import RunStats
from medvl_engine.rollout.config import DataConfig, RolloutConfig
from medvl_engine.rollout.pool import run_to_end

logger = logging.getLogger(__name__)

# Settings that may differ between attempts of one run. Not `rollout.max_batch` with the hf backend: its
# batches are padded together, so greedy answers depend on which questions share a generate call.
VOLATILE = ("rollout.device", "rollout.max_in_flight", "rollout.threads", "run.output", "run.overwrite",
            "run.repeats")


def eval_data() -> DataConfig:
    return DataConfig(source="UCSC-VLAA/MedVLThinker-Eval", split="test", shuffle=False)


def eval_rollout() -> RolloutConfig:
    return RolloutConfig(n=1, temperature=0.0, top_p=1.0, max_response_tokens=4096, seed=42, engine_seed=42,
                         max_in_flight=32)


def sections(cfg) -> dict:
    """The settings grouped by component (`data`, `rollout`, `run`) for the manifest."""
    values = config_lib.to_dict(cfg)
    out = {"data": values.pop("data"), "rollout": values.pop("rollout")}
    out["run"] = values
    return out


def check_generation_config(cfg) -> None:
    """What eval and pass-rate runs reject: settings of a learner that would silently do nothing here."""
    if cfg.rollout.dynamic_sampling:
        raise ConfigError("rollout.dynamic_sampling drops questions whose answers all score the same: an evaluation "
                          "or a pass-rate run must keep every question")
    if cfg.data.shuffle:
        raise ConfigError("data.shuffle: evaluation and pass-rate runs answer each question once, in dataset order "
                          "(use data.max_samples or data.subset to select questions)")


def volatile_settings(cfg, volatile: tuple[str, ...]) -> tuple[str, ...]:
    """`volatile`, plus `rollout.max_batch` for the backends that do not read it (all but hf)."""
    return volatile if cfg.rollout.backend == "hf" else (*volatile, "rollout.max_batch")


def check_model_and_output(cfg, *, check_model: bool = True) -> str | None:
    """What can be checked before the questions load (a hub dataset takes seconds): the model folder
    exists (unless backends were given) and `--output` is not a file. Returns the model's folder (None
    when backends were given)."""
    from medvl_engine.models import resolve_model_path

    if Path(cfg.output).exists() and not Path(cfg.output).is_dir():
        raise RunFolderError(f"--output {cfg.output}: is a file; give a run folder (created, or resumed)")
    return resolve_model_path(cfg.model) if check_model else None


def open_checked_run(cfg, command: str, volatile: tuple[str, ...], *, model: str | None) -> dict:
    """The run folder of an eval or pass-rate run, opened once its inputs are known good: the model resolved
    to `model` (`check_model_and_output`; None when backends were given) and the data has loaded. Only then
    may `--overwrite` remove an earlier run."""
    from medvl_engine.evals.manifest import open_run

    return open_run(cfg.output, command, sections(cfg), volatile=volatile_settings(cfg, volatile),
                    overwrite=cfg.overwrite, inputs=(cfg.model, model, cfg.data.source))


@dataclass
class EvalConfig:
    """An evaluation run: a model, the questions, how they are answered (MedVLThinker's defaults), repeats."""

    model: str = param("", "model folder (Hugging Face layout) or `smollm2` for the embedded default")
    output: str = param("", "run folder (created, or resumed when it holds this run)")
    repeats: int = param(1, "independent repeats (MedVLThinker's tables: 3)")
    overwrite: bool = param(False, "replace an earlier eval run in the output folder instead of resuming it (only a "
                            "folder medvl-engine wrote; never one holding the model or data)")
    data: DataConfig = field(default_factory=eval_data)
    rollout: RolloutConfig = field(default_factory=eval_rollout)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("model: is required (a model folder, or `smollm2`)")
        if not self.output:
            raise ConfigError("output: is required (the run folder)")
        if self.repeats < 1:
            raise ConfigError(f"repeats: must be >= 1, got {self.repeats}")
        check_generation_config(self)


def run_generation_command(cfg, command: str, volatile: tuple[str, ...], generate, results_files, write_tables, *,
                           backends=None, renderer=None):
    """The body of `eval` and `passrate`: check the model and `output`, load the questions, open the run folder
    (`open_checked_run`), build the backends, run `generate(questions, backends, renderer)` (a coroutine
    function writing the results files) on the pool to its end, then `write_tables()`. Returns the stats
    `generate` returned and what `write_tables` returned.

    `backends` and `renderer` (the tokenizer or processor that renders prompts) may be given instead of
    being built from `cfg.model`; backends built here are shut down at the end. On Ctrl-C the run stops with
    `interrupted(results_files())`: what was kept, and where.
    """
    from medvl_engine.evals.runner import build_backends, interrupted, shutdown
    from medvl_engine.rollout.stream import load_data

    owned = backends is None
    model = check_model_and_output(cfg, check_model=owned)
    questions = load_data(cfg.data)
    open_checked_run(cfg, command, volatile, model=model)
    if owned:
        backends, renderer = build_backends(cfg.rollout, cfg.model, questions)

    async def run():
        stopped = False
        try:
            return await generate(questions, backends, renderer)
        except asyncio.CancelledError:
            # Ctrl-C: asyncio.run cancels this task. Every finished answer is on disk; a generate call still
            # running in a backend's thread is not waited for (on a CPU it can take minutes).
            stopped = True
            raise interrupted(results_files()) from None
        finally:
            if owned and not stopped:
                await shutdown(backends)

    stats = run_to_end(run())
    return stats, write_tables()


def evaluate(cfg: EvalConfig, *, backends=None, renderer=None) -> tuple[list[RunStats], str]:
    """Run (or resume) the evaluation and write its report; returns each repeat's stats and the markdown.

    `backends` and `renderer` (the tokenizer or processor that renders prompts) may be given instead of
    being built from `cfg.model`; backends built here are shut down at the end.
    """
    from medvl_engine.evals.report import write_run_report
    from medvl_engine.evals.results import ResultsFile
    from medvl_engine.evals.runner import generate_into

    async def generate(questions, backends, renderer) -> list[RunStats]:
        out = []
        for k in range(cfg.repeats):
            stats = await generate_into(ResultsFile(run_folder.repeat_results(cfg.output, k)), questions, backends,
                                        renderer, cfg.rollout, mode="eval", seed_offset=k, label=f"eval v{k}")
            out.append(stats)
        return out

    return run_generation_command(cfg, "eval", VOLATILE, generate,
                                  lambda: sorted(Path(cfg.output).glob(run_folder.REPEAT_RESULTS_GLOB)),
                                  lambda: write_run_report(cfg.output)[0], backends=backends, renderer=renderer)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_lib.add_arguments(parser, EvalConfig)


def main(args: argparse.Namespace) -> int:
    cfg = config_lib.from_args(EvalConfig, args)
    stats, markdown = evaluate(cfg)
    print(markdown)
    for k, s in enumerate(stats):
        logger.info("v%d: %d answered, %d already done, %d failed; %.2f questions/s, %.0f generated tokens/s", k,
                    s.written, s.skipped, len(s.failed), s.questions_per_s, s.tokens_per_s)
        for index, reason in s.failed[:10]:
            logger.error("v%d: dataset_index %s failed: %s", k, index, reason)
    if any(s.failed for s in stats):
        logger.error("some questions failed; run the same command again to retry them (finished ones are kept)")
        return 1
    return 0
