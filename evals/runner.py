"""Generation runs: a prompt stream through the RolloutPool into a results file, one line as each finishes.

This is what `medvl-engine eval` and `medvl-engine passrate` share. The questions are one epoch of a
PromptStream in dataset order (position k is question k, sampled with the stream's seed for k), the
pool keeps every backend saturated (groups in flight, no batch barrier: a question is written the
moment its n answers are in), and every answer is scored once, by the pool. The results file skips
questions a previous attempt already finished.

    samples = load_data(DataConfig(source="bundled", shuffle=False))
    backend = make_rollout_backend(rollout, model_path)
    stats = run_generation(ResultsFile("run/results.jsonl"), samples, [backend], renderer, rollout, mode="reward")
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from medvl_engine.errors import DataError
from medvl_engine.evals.results import ResultsFile
from medvl_engine.progress import Progress

logger = logging.getLogger(__name__)


class AnswerRecord(msgspec.Struct):
    """One answer of a question, in MedVLThinker's `parsed_outputs` layout plus what the parser found."""

    output_text: str
    pred_letter: str  # MedVLThinker's field: the option letter the answer maps to, else the extracted text
    parsed: str  # the extracted answer (the parser mode's extraction, not lowered)
    letter: str  # the option letter it maps to ("" when none)
    is_correct: bool  # by the run's parser mode (reward: the format gate counts)
    format_ok: bool  # `<think>...</think>` and `<answer>...</answer>` in MedVLThinker's reward format
    finish_reason: str
    num_tokens: int


class QuestionRecord(msgspec.Struct):
    """One results line: a question and its answers (MedVLThinker's eval_results.jsonl layout, plus
    `options` so a file can be rescored alone, and the stream position and seed it was sampled with)."""

    dataset_name: str
    dataset_index: int
    answer_label: str
    answer: str
    options: dict[str, str]
    prompts: str
    parsed_outputs: list[AnswerRecord]
    num_rollouts: int
    num_correct: int
    position: int
    seed: int  # -1: greedy, no seed


def build_backends(rollout, model: str, samples: Sequence = ()) -> tuple[list, object]:
    """One backend of `rollout` for `model` (room for the most images one of `samples` carries) and the
    tokenizer/processor whose chat template renders prompts."""
    from medvl_engine.rollout.config import open_rollout

    backend, renderer, _ = open_rollout(rollout, model, samples)
    return [backend], renderer


def make_record(group, mode: str) -> QuestionRecord:
    """The results line of a scored group: the pool's scores, never a second parse."""
    request, sample = group.request, group.request.sample
    hits = group.rewards > 0 if mode == "reward" else group.correct
    outputs = [
        AnswerRecord(output_text=c.text, pred_letter=letter or parsed, parsed=parsed, letter=letter,
                     is_correct=bool(hit), format_ok=bool(ok), finish_reason=c.finish_reason,
                     num_tokens=c.num_tokens)
        for c, parsed, letter, hit, ok in zip(group.completions, group.parsed, group.letters, hits, group.format_ok)
    ]
    return QuestionRecord(
        dataset_name=sample.dataset_name, dataset_index=sample.dataset_index, answer_label=sample.answer_label,
        answer=sample.answer, options=dict(sample.options), prompts=request.text or "", parsed_outputs=outputs,
        num_rollouts=len(outputs), num_correct=sum(o.is_correct for o in outputs), position=request.position,
        seed=-1 if request.seed is None else request.seed)


@dataclass
class RunStats:
    """What one `generate_into` call did."""

    questions: int = 0
    skipped: int = 0
    written: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def questions_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def generate_into(
    results: ResultsFile,
    samples: Sequence,
    backends: Sequence,
    renderer,
    rollout,
    *,
    mode: str,
    seed_offset: int = 0,
    label: str = "",
    progress_every_s: float = 10.0,
) -> RunStats:
    """Answer every question of `samples` not yet in `results` and append one record per question.

    `rollout` (a RolloutConfig) gives the sampling and the pool's bounds; sampling runs seed each
    position with `rollout.seed + seed_offset` (repeat k of an evaluation), greedy runs carry no seed.
    `mode` is the parser that fills `is_correct` (eval, as MedVLThinker grades evaluations and pass counts).
    Progress (questions done of all, answers/s, ETA) goes to stderr under `label`, a line at most every
    `progress_every_s` when stderr is not a terminal (0: none; see medvl_engine.progress).
    """
    from medvl_engine.profiling import stage
    from medvl_engine.rollout.groups import FailedPrompt
    from medvl_engine.rollout.pool import RolloutPool
    from medvl_engine.rollout.stream import PromptStream

    indices = [s.dataset_index for s in samples]
    if len(set(indices)) != len(indices):
        raise DataError("the selected questions repeat a dataset_index; results are keyed by it")
    done = results.open()
    stats = RunStats(questions=len(samples), skipped=sum(1 for i in indices if i in done))
    stream = PromptStream(samples, renderer, shuffle_seed=None,
                          sample_seed=None if rollout.greedy else rollout.seed + seed_offset, stop=len(samples),
                          max_prompt_tokens=rollout.max_prompt_tokens,
                          skip=lambda position: samples[position].dataset_index in done)
    pool = RolloutPool.from_config(backends, stream.requests(), rollout, logprobs=False, score_mode=mode)
    bar = Progress(stats.questions, label or mode, unit="question", initial=stats.skipped,
                   enabled=progress_every_s > 0, interval_s=progress_every_s)
    start = time.perf_counter()
    with stage("eval_generate"), bar:  # the whole pass; the pool marks each group's generate and score
        try:
            async for item in pool.stream():
                if isinstance(item, FailedPrompt):
                    stats.failed.append((item.request.sample.dataset_index, item.reason))
                    bar.update(1)
                    continue
                results.append(make_record(item, mode))
                stats.written += 1
                stats.tokens += item.num_tokens
                elapsed = time.perf_counter() - start
                bar.set_postfix(f"{stats.written * rollout.n / elapsed:.2f} answers/s, "
                                f"{stats.tokens / elapsed:.0f} tok/s")
                bar.update(1)
        finally:
            stats.seconds = time.perf_counter() - start
            results.close()
    if not stats.failed and stats.skipped + stats.written == stats.questions:
        results.finalize()
    return stats


def run_generation(*args, **kwargs) -> RunStats:
    """`generate_into` on a fresh event loop (for callers that are not async)."""
    return asyncio.run(generate_into(*args, **kwargs))


def interrupted(paths: Sequence[Path]):
    """The `Interrupted` a run stopped by Ctrl-C raises: how many questions its results files `paths` keep.

    Every finished question is already on disk (a line is appended as each finishes); the lines of the
    questions in flight were never written, and a rerun generates exactly those."""
    from medvl_engine.errors import Interrupted

    kept = {Path(p): _complete_lines(Path(p)) for p in paths if Path(p).is_file()}
    total = sum(kept.values())
    if len(kept) == 1:
        where = str(next(iter(kept)))
    elif kept:
        where = f"{len(kept)} results files ({', '.join(str(p) for p in kept)})"
    else:
        where = "no results file yet"
    return Interrupted(f"interrupted: {total} answered questions kept in {where}; run the same command again "
                       "to resume")


def _complete_lines(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.endswith(b"\n"))


async def shutdown(backends: Sequence) -> None:
    for backend in backends:
        await backend.shutdown()
