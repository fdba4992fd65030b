"""Generation runs: questions through the RolloutPool into a results file, one line as each finishes.

This is what `medvl-engine eval` and `medvl-engine passrate` share. The pool keeps every backend
saturated (groups in flight, no batch barrier: a question is written the moment its n answers are
in), each question is one request with `n` samples (the engine shares the prompt's prefix across
them), and the results file skips questions a previous attempt already finished.

    questions = load_questions(QuestionsConfig(source="bundled", limit=8))
    backends, renderer = build_backends(EngineConfig(model="smollm2"))
    stats = run_generation(ResultsFile("run/results.jsonl"), questions, backends, renderer,
                           DecodingConfig(n=16, temperature=1.0).params(), mode="reward")
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from medvl_engine.config import param
from medvl_engine.evals.results import ResultsFile

DTYPES = ("auto", "bf16", "fp16", "fp32")


@dataclass
class QuestionsConfig:
    """Which questions: a dataset in the unified schema, optionally some of its benchmarks, optionally the first N."""

    source: str = param("UCSC-VLAA/MedVLThinker-Eval",
                        "hub name, save_to_disk folder, parquet or jsonl (`bundled`: the bundled set)")
    split: str = param("test", "split to read when the source has several")
    subset: list[str] = param(factory=list, help="only these dataset_name values (empty: all)")
    limit: int = param(0, "only the first N questions after --subset (0: all)")
    ignore_images: bool = param(False, "drop the images and send the text alone (MedVLThinker's --ignore_image)")

    def __post_init__(self):
        if not self.source:
            raise ValueError("--source: may not be empty")
        if self.limit < 0:
            raise ValueError(f"--limit: must be >= 0, got {self.limit}")


@dataclass
class EngineConfig:
    """Which model on which generation backend."""

    model: str = param("", "model folder (Hugging Face layout) or `smollm2` for the embedded default")
    backend: Literal["hf", "sglang"] = param("hf", "generation backend")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = param("auto", "weights' precision (auto: the checkpoint's)")
    device: str = param("cpu", "device of the hf backend (cpu, cuda, cuda:1, ...)")
    max_batch: int = param(16, "sequences per generate call of the hf backend")

    def __post_init__(self):
        if not self.model:
            raise ValueError("--model: is required (a model folder, or `smollm2`)")
        if self.max_batch < 1:
            raise ValueError(f"--max-batch: must be >= 1, got {self.max_batch}")


@dataclass
class DecodingConfig:
    """How each question is answered: n samples, temperature, nucleus, length, seed."""

    n: int = param(1, "answers per question")
    temperature: float = param(0.0, "sampling temperature (0: greedy)")
    top_p: float = param(1.0, "nucleus sampling")
    top_k: int = param(-1, "top-k sampling (-1: off)")
    max_new_tokens: int = param(4096, "answer length cap")
    seed: int = param(42, "sampling seed; each question samples with its own seed derived from it")

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"--n: must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"--temperature: must be >= 0, got {self.temperature}")
        if self.seed < 0:
            raise ValueError(f"--seed: must be >= 0, got {self.seed}")

    def params(self, *, seed_offset: int = 0):
        """SamplingParams for the pool. Greedy decoding carries no seed; sampling carries the run seed
        (+ offset), which `generate_into` turns into one seed per question (`PromptRequest.seed`)."""
        from medvl_engine.rollout.types import SamplingParams

        seed = None if self.temperature == 0 else self.seed + seed_offset
        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_new_tokens, seed=seed, return_logprobs=False)


# --- questions ---------------------------------------------------------------------------------------


def load_questions(cfg: QuestionsConfig) -> list:
    """The selected samples in dataset order: `subset` names filter by dataset_name, then `limit` cuts."""
    from medvl_engine.data import load_bundled, load_samples

    samples = list(load_bundled() if cfg.source == "bundled" else load_samples(cfg.source, split=cfg.split))
    if cfg.subset:
        present = {s.dataset_name for s in samples}
        unknown = sorted(set(cfg.subset) - present)
        if unknown:
            raise ValueError(f"--subset: {unknown} not in {cfg.source} (its datasets: {sorted(present)})")
        samples = [s for s in samples if s.dataset_name in cfg.subset]
    if cfg.limit:
        samples = samples[: cfg.limit]
    if cfg.ignore_images:
        samples = [replace(s, images=[]) for s in samples]
    if not samples:
        raise ValueError(f"{cfg.source}: no questions selected")
    return samples


# --- engines -----------------------------------------------------------------------------------------


def resolve_model(model: str) -> str:
    """A model folder; `smollm2` becomes the embedded default's folder (converted once and cached)."""
    if model == "smollm2":
        from medvl_engine.models import resolve_model_path

        return resolve_model_path(model)
    return model


def build_backends(cfg: EngineConfig) -> tuple[list, object]:
    """One backend for `cfg` and the tokenizer/processor whose chat template renders the prompts."""
    from medvl_engine.rollout.backend import make_backend

    path = resolve_model(cfg.model)
    kwargs: dict = {}
    if cfg.backend == "hf":
        kwargs = {"device": cfg.device, "max_batch": cfg.max_batch}
        if cfg.dtype != "auto":
            import torch

            kwargs["dtype"] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[cfg.dtype]
    backend = make_backend(cfg.backend, path, **kwargs)
    renderer = getattr(backend, "processor", None)
    if renderer is None:
        from transformers import AutoTokenizer

        renderer = AutoTokenizer.from_pretrained(path)
    return [backend], renderer


def question_seed(seed: int, dataset_index: int) -> int:
    """A question's own sampling seed: a function of the run seed and its index only, so a question
    samples the same answers whichever questions ran before it (a resumed run equals an uninterrupted one),
    and questions do not share one random stream (correlated samples across questions)."""
    from medvl_engine.rollout.types import derive_seed

    return derive_seed(seed, dataset_index)


def make_request(renderer, sample, seed: int | None = None):
    """The PromptRequest of one question: MedVLThinker's prompt rendered by the model's chat template.

    `seed` is the run's sampling seed (None: greedy); the request samples with `question_seed(seed, index)`."""
    from medvl_engine.prompts import render_prompt
    from medvl_engine.rollout.types import PromptRequest

    text = render_prompt(renderer, sample)
    tokenizer = getattr(renderer, "tokenizer", renderer)
    input_ids = tokenizer(text, add_special_tokens=False).input_ids
    return PromptRequest(prompt_id=str(sample.dataset_index), input_ids=input_ids, text=text,
                         images=list(sample.images), sample=sample,
                         seed=None if seed is None else question_seed(seed, sample.dataset_index))


# --- the run -----------------------------------------------------------------------------------------


def make_record(sample, prompt: str, texts: Sequence[str], completions: Sequence, mode: str) -> dict:
    """One results line in MedVLThinker's layout; `is_correct` and `pred_letter` (the extracted answer
    string, as MedVLThinker names it) come from the parser `mode` (reward: the format gate counts)."""
    from medvl_engine.rewards import score_samples

    scored = score_samples(list(texts), [sample] * len(texts), mode=mode, threads=1)
    hits = scored.reward > 0 if mode == "reward" else scored.correct
    outputs = [
        {"output_text": text, "pred_letter": parsed, "is_correct": bool(hit), "finish_reason": c.finish_reason,
         "num_tokens": c.num_tokens}
        for text, parsed, hit, c in zip(texts, scored.parsed, hits, completions)
    ]
    return {
        "dataset_name": sample.dataset_name,
        "dataset_index": sample.dataset_index,
        "answer_label": sample.answer_label,
        "answer": sample.answer,
        "options": sample.options,
        "prompts": prompt,
        "parsed_outputs": outputs,
        "num_rollouts": len(outputs),
        "num_correct": int(sum(o["is_correct"] for o in outputs)),
    }


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


def _requests(renderer, samples, done: set[int], seed: int | None) -> Iterator:
    # Lazy: prompts are rendered (and images handed over) only as the pool pulls them.
    for sample in samples:
        if sample.dataset_index not in done:
            yield make_request(renderer, sample, seed)


async def generate_into(
    results: ResultsFile,
    samples: Sequence,
    backends: Sequence,
    renderer,
    params,
    *,
    mode: str,
    max_in_flight: int | None = None,
    label: str = "",
    progress_every_s: float = 10.0,
) -> RunStats:
    """Answer every question of `samples` not yet in `results` and append one record per question.

    `mode` is the parser that fills `is_correct` (eval for evaluation, reward for pass counts).
    `max_in_flight` (groups per backend) defaults to two full generate calls' worth of questions, so
    a backend always has its next batch queued while it computes the current one.
    """
    from medvl_engine.rollout.pool import FailedPrompt, RolloutPool

    indices = [s.dataset_index for s in samples]
    if len(set(indices)) != len(indices):
        raise ValueError("the selected questions repeat a dataset_index; results are keyed by it")
    done = results.open()
    stats = RunStats(questions=len(samples), skipped=sum(1 for i in indices if i in done))
    if max_in_flight is None:
        max_batch = getattr(backends[0], "max_batch", 16)
        max_in_flight = max(1, 2 * max_batch // params.n)
    pool = RolloutPool(backends, _requests(renderer, samples, done, params.seed), params, max_in_flight=max_in_flight,
                       score_mode=mode)
    start = last = time.perf_counter()
    try:
        async for item in pool.stream():
            request = item.request
            if isinstance(item, FailedPrompt):
                stats.failed.append((request.sample.dataset_index, item.reason))
                continue
            texts = [c.text for c in item.completions]
            results.append(make_record(request.sample, request.text, texts, item.completions, mode))
            stats.written += 1
            stats.tokens += item.num_tokens
            now = time.perf_counter()
            if progress_every_s and now - last >= progress_every_s:
                last = now
                finished = stats.skipped + stats.written
                print(f"{label}{finished}/{stats.questions} questions, {stats.written / (now - start):.2f} q/s, "
                      f"{stats.tokens / (now - start):.0f} tok/s", file=sys.stderr, flush=True)
    finally:
        stats.seconds = time.perf_counter() - start
        results.close()
    if not stats.failed and stats.skipped + stats.written == stats.questions:
        results.finalize()
    return stats


def run_generation(*args, **kwargs) -> RunStats:
    """`generate_into` on a fresh event loop (for callers that are not async)."""
    return asyncio.run(generate_into(*args, **kwargs))


async def shutdown(backends: Sequence) -> None:
    for backend in backends:
        await backend.shutdown()
