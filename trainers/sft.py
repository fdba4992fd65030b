"""`medvl-engine sft`: supervised fine-tuning on reasoning traces with DeepSpeed.

Each example is the chat-templated prompt followed by MedVLThinker's target
`<think> {reasoning} </think>\\n<answer> {letter} </answer>` and the end-of-turn token; only the
target and its end-of-turn token carry loss. The loss is the mean over all target tokens of the
global batch (not a mean of per-micro-batch means), so it does not depend on how the batch is split
over ranks and micro-batches.

Rows are checked before the first step from their text and their images' sizes (`check_example`: token
counts, image placeholders; nothing decoded) and encoded a step at a time, each rank only its share, the next
step's rows on a worker thread while this step trains (`EncodedAhead`). Encoding every row up front held each
image's float32 patches for the whole run: ~4.8 MB per 448x448 image, ~850 GB per rank for PMC-VQA's 176,896.

    medvl-engine sft --model smollm2 --data.source bundled --output runs/sft
    torchrun --nproc_per_node 8 -m medvl_engine.cli sft --config sft.yaml --deepspeed.zero-stage 3
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medvl_engine import config as config_lib
from medvl_engine import run_folder
from medvl_engine.data import Sample
from medvl_engine.errors import ConfigError, DataError
from medvl_engine.profiling import StepProfiler, stage
from medvl_engine.progress import Progress
from medvl_engine.rollout.stream import epoch_order
from medvl_engine.trainers.config import SFTConfig, with_switches


@dataclass
class SFTExample:
    """Token ids of prompt + target; tokens from `loss_start` on carry loss."""

    ids: list[int]
    loss_start: int
    dataset_index: int
    vision: dict = field(default_factory=dict)  # pixel_values / image_grid_thw of an image row

    def __post_init__(self):
        if not 0 < self.loss_start < len(self.ids):
            raise ValueError(f"SFTExample {self.dataset_index}: loss start {self.loss_start} "
                             f"outside the {len(self.ids)} tokens")


@dataclass(frozen=True)
class SFTRow:
    """A row checked for training but not encoded: its sample (images still compressed bytes) and its token
    counts, from the text and the images' sizes alone."""

    sample: Sample
    tokens: int  # prompt with its image tokens expanded, then the target
    target_tokens: int  # those that carry loss


def end_of_turn(tokenizer) -> str:
    """The text the chat template puts after an assistant message (ChatML: `<|im_end|>`)."""
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text.split(marker, 1)[1]
    return tail.rstrip("\n") or (tokenizer.eos_token or "")


def _where(sample) -> str:
    return f"SFT example {sample.dataset_name}[{sample.dataset_index}]"


def _token_ids(tokenizer, sample, processor, target: str) -> tuple[list[int], list[int]]:
    """The prompt's token ids (one placeholder per image) and the target's (it ends with the end-of-turn).

    Prompt and target are tokenized apart so the loss boundary falls exactly between them (ChatML ends the
    prompt with "assistant\\n", a token boundary in every BPE vocabulary we use)."""
    from medvl_engine.prompts import render_prompt, render_vqa_prompt, sft_target

    if sample.images and processor is None:
        raise ConfigError(f"{_where(sample)} has {len(sample.images)} image(s) but the policy is a text-only model "
                          "(set --data.text-only or --data.ignore-images)")
    if target == "answer":  # free-form VQA: the question alone, the answer text as the target
        prompt = render_vqa_prompt(processor or tokenizer, sample)
        target = sample.answer.strip() + end_of_turn(tokenizer)
    else:
        prompt = render_prompt(processor or tokenizer, sample)
        target = sft_target(sample) + end_of_turn(tokenizer)
    return (tokenizer(prompt, add_special_tokens=False)["input_ids"],
            tokenizer(target, add_special_tokens=False)["input_ids"])


def check_example(tokenizer, sample, *, max_tokens: int, processor=None, target: str = "reasoning") -> SFTRow:
    """What can be checked of a row without decoding its images, naming the row: a text-only policy for an image
    row, image placeholders that do not pair up with the images (one in the row's text too: it would reach the
    model's forward), and the length with each image's tokens counted from its size (`expanded_length`)."""
    return _checked(sample, *_token_ids(tokenizer, sample, processor, target), max_tokens, processor)


def _checked(sample, prompt_ids: list[int], target_ids: list[int], max_tokens: int, processor) -> SFTRow:
    from medvl_engine.vision import expanded_length, placeholder_mismatch

    mismatch = placeholder_mismatch(prompt_ids + target_ids, len(sample.images), processor)
    if mismatch:
        token = getattr(processor, "tokenizer", processor).convert_ids_to_tokens(processor.image_token_id)
        texts = {"'question'": sample.question, "'answer'": sample.answer, "'reasoning'": sample.reasoning or "",
                 **{f"'options'[{letter}]": text for letter, text in sample.options.items()}}
        holders = [f"field {name}" for name, text in texts.items() if token in text]
        held = f"; {', '.join(holders)} holds {token!r}" if holders else ""
        raise DataError(f"{_where(sample)}: {mismatch}{held}")
    tokens = expanded_length(prompt_ids, sample.images, processor) + len(target_ids)
    if tokens > max_tokens:
        raise ConfigError(f"{_where(sample)}: {tokens} tokens > max_tokens {max_tokens} (raise --max-tokens; "
                          "examples are never truncated)")
    return SFTRow(sample, tokens, len(target_ids))


def encode_example(tokenizer, sample, *, max_tokens: int, processor=None, target: str = "reasoning") -> SFTExample:
    """Prompt (chat template with the generation prompt) + target + end-of-turn, and where the loss starts.

    An image row needs the `processor` of an image-text model: its placeholders are expanded as the engine
    would, and its images decoded and turned into `pixel_values` here, at the row's turn to train."""
    from medvl_engine.vision import expand_image_tokens

    prompt_ids, target_ids = _token_ids(tokenizer, sample, processor, target)
    row = _checked(sample, prompt_ids, target_ids, max_tokens, processor)
    vision: dict = {}
    if sample.images:
        try:
            prompt_ids, vision = expand_image_tokens(prompt_ids, sample.images, processor)
        except (OSError, SyntaxError) as exc:
            # Only decoding finds what the loader's `verify()` cannot see (a truncated JPEG): this fails at the
            # row's turn, not before the first step, since decoding every row up front is what this file avoids.
            raise DataError(f"{_where(sample)}: field 'images': not a decodable image ({exc})") from None
    ids = list(prompt_ids) + list(target_ids)
    if len(ids) != row.tokens:
        raise ValueError(f"{_where(sample)}: {len(ids)} tokens encoded, {row.tokens} counted from the image sizes")
    return SFTExample(ids, len(prompt_ids), sample.dataset_index, vision)


def load_rows(cfg: SFTConfig, tokenizer, processor=None) -> list[SFTRow]:
    """The rows to train on, in dataset order, each checked (`check_example`) and none encoded."""
    from medvl_engine.rollout.stream import load_data

    samples = load_data(cfg.data)
    if cfg.target == "reasoning":
        samples = [s for s in samples if s.reasoning]
        if not samples:
            raise DataError(f"data.source {cfg.data.source!r}: no sample has a reasoning trace to train on "
                            "(free-form VQA rows, e.g. from `medvl-engine build-data reformat`: --target answer)")
    else:
        samples = [s for s in samples if s.answer.strip()]
        if not samples:
            raise DataError(f"data.source {cfg.data.source!r}: no sample has an answer to train on")
    return [check_example(tokenizer, s, max_tokens=cfg.max_tokens, processor=processor, target=cfg.target)
            for s in samples]


class EncodedAhead:
    """`encode(step)` for each step asked, the next step's started on one worker thread as this one is handed
    over, so the encoding of images hides behind the step that trains: steps asked in order hold at most two
    steps' encoded rows (the one training and the next).

    All encoding runs on that one thread (tokenizer, processor and the samples' lazily decoded images are
    touched by no other thread once training starts); its errors are raised by `get` of their step."""

    def __init__(self, encode: Callable[[int], list[SFTExample]], stop: int):
        self._encode = encode
        self._stop = stop
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sft-encode")
        self._next: tuple[int, Future] | None = None

    def get(self, step: int) -> list[SFTExample]:
        pending, self._next = self._next, None
        if pending is not None and pending[0] != step:  # not the step in order (a test driving steps by hand)
            pending[1].cancel()
            pending = None
        future = pending[1] if pending else self._pool.submit(self._encode, step)
        if step + 1 < self._stop:
            self._next = (step + 1, self._pool.submit(self._encode, step + 1))
        return future.result()

    def close(self) -> None:
        self._next = None
        self._pool.shutdown(wait=True, cancel_futures=True)


class SFTTrainer:
    """One optimizer step per global batch of `rows`; `close()` stops the thread that encodes them."""

    def __init__(self, cfg: SFTConfig, learner, rows: list[SFTRow]):
        self.cfg = cfg
        self.learner = learner
        self.rows = rows
        self.steps_per_epoch = len(rows) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(rows)} examples are fewer than one global batch ({cfg.global_batch_size})")
        self.total_steps = total_steps(cfg, len(rows))
        self.step_index = 0
        processor = learner.processor
        self.image_token = getattr(processor, "image_token_id", None) if processor is not None else None
        self.pad_token = learner.tokenizer.pad_token_id  # read here: from now on only the encoding thread uses it
        self.encoded = EncodedAhead(self._encode_mine, self.total_steps)

    def batch(self, step: int) -> list[SFTRow]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        # The one definition of data order (the prompt stream's): a function of (seed, epoch) only.
        order = epoch_order(len(self.rows), self.cfg.data.seed if self.cfg.data.shuffle else None, epoch)
        start = offset * self.cfg.global_batch_size
        return [self.rows[i] for i in order[start : start + self.cfg.global_batch_size]]

    def mine(self, batch: list[SFTRow]) -> list[SFTRow]:
        """This rank's share of a global batch."""
        per_rank = len(batch) // self.learner.world_size
        return batch[self.learner.rank * per_rank : (self.learner.rank + 1) * per_rank]

    def _encode_mine(self, step: int) -> list[SFTExample]:
        learner = self.learner
        return [encode_example(learner.tokenizer, row.sample, max_tokens=self.cfg.max_tokens,
                               processor=learner.processor, target=self.cfg.target)
                for row in self.mine(self.batch(step))]

    def close(self) -> None:
        self.encoded.close()

    def train_step(self, step: int) -> dict:
        with stage("sft_step"):
            return self._train_step(step)

    def _train_step(self, step: int) -> dict:
        from medvl_engine.trainers.learner import pad_sequences
        from medvl_engine.vision import batch_vision

        learner = self.learner
        start = time.perf_counter()
        # Counted from the whole global batch's rows: no rank needs the others' encodings for the token mean.
        total_tokens = sum(row.target_tokens for row in self.batch(step))
        with stage("encode_wait"):  # only what the worker thread did not finish during the step before
            mine = self.encoded.get(step)
        # engine.backward divides by the accumulation steps and the gradients are averaged over ranks:
        # scaling the token sum by gas * world / total_tokens makes the update the global token mean.
        scale = learner.gradient_accumulation_steps * learner.world_size / total_tokens
        micro_size = self.cfg.deepspeed.micro_batch_size
        loss_sum = 0.0
        for i in range(0, len(mine), micro_size):
            chunk = mine[i : i + micro_size]
            micro = pad_sequences([e.ids for e in chunk], [e.loss_start for e in chunk],
                                  self.pad_token)
            micro.vision = batch_vision([e.vision for e in chunk], micro.input_ids, self.image_token)
            micro = micro.to(learner.device)
            with stage("forward"):
                logp = learner.response_logprobs(micro)
            with stage("loss"):
                nll = -(logp * micro.mask).sum()
            with stage("backward"):
                learner.backward(nll * scale)
            with stage("optimizer_step"):
                learner.step()
            loss_sum += float(nll.detach())
        stats = torch.tensor([loss_sum], dtype=torch.float64)
        if learner.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(stats)
        return {"step": step + 1, "loss": float(stats[0]) / total_tokens, "lr": learner.lr(),
                "grad_norm": learner.grad_norm(), "tokens": total_tokens, "seconds": time.perf_counter() - start}


def total_steps(cfg: SFTConfig, num_examples: int) -> int:
    steps = cfg.epochs * (num_examples // cfg.global_batch_size)
    return min(steps, cfg.max_steps) if cfg.max_steps else steps


def run(cfg: SFTConfig, *, resume: bool | None = None, overwrite: bool | None = None,
        allow_changes: bool | None = None) -> list[dict]:
    """Train; returns the per-step metrics (also written to output/metrics.jsonl on rank 0). SIGTERM or Ctrl-C
    stops it after the step in flight, with a checkpoint: `preemption.Preempted`.

    `resume`, `overwrite`, `allow_changes` override the config's switches of the same names when given.
    """
    from medvl_engine.trainers import checkpoint
    from medvl_engine.trainers.distributed import seed_everything
    from medvl_engine.trainers.learner import Learner
    from medvl_engine.trainers.metrics import MetricsLog
    from medvl_engine.trainers.model import load_processor, load_tokenizer
    from medvl_engine.trainers.preemption import StopAfterStep, preempted

    cfg = with_switches(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    resume = cfg.resume
    checkpoint.prepare_run_dir(cfg.output, resume=resume, overwrite=cfg.overwrite,
                               config=config_lib.to_dict(cfg), allow_changes=cfg.allow_changes)
    seed_everything(cfg.seed)
    rows = load_rows(cfg, load_tokenizer(cfg.model.path), load_processor(cfg.model.path))
    steps = total_steps(cfg, len(rows))
    learner = Learner.build(cfg.model, cfg.optim, cfg.deepspeed, train_batch_size=cfg.global_batch_size,
                            total_steps=steps, fused_logprobs=cfg.model.fused_logprobs)
    trainer = SFTTrainer(cfg, learner, rows)
    run_dir = Path(cfg.output)
    start = 0
    if resume:
        state = checkpoint.load_checkpoint(learner, run_dir)
        start = state["step"] if state else 0
    if learner.rank == 0:
        config_lib.save(cfg, run_dir / run_folder.CONFIG)
    history = []
    profiler = StepProfiler.from_config(cfg.profile, run_dir, learner.rank)
    bar = Progress(steps, "sft", unit="step", initial=start, enabled=learner.rank == 0, heartbeat=True)
    signals = StopAfterStep("sft", run_dir, announce=learner.rank == 0)  # see preemption.py
    with (closing(trainer), signals,
          MetricsLog(run_dir, learner.rank, resume_step=start if resume else None, config=cfg) as log, profiler, bar):
        for step in range(start, steps):
            profiler.begin(step + 1)
            row = trainer.train_step(step)
            profiler.end(row["step"])
            history.append(row)
            log.write(row)
            bar.set_postfix(f"loss {row['loss']:.4f}")
            bar.update(1)
            if learner.rank == 0 and (step + 1) % cfg.logging.log_every == 0:
                bar.write(f"sft step {row['step']}/{steps} loss {row['loss']:.4f} lr {row['lr']:.3g} "
                          f"grad_norm {row['grad_norm']:.3g} ({row['seconds']:.1f}s)")
            # A signal during the last step lets the run end as usual (final checkpoint, export, exit 0).
            signum = signals.requested(learner.world_size, learner.device) if step + 1 < steps else 0
            if signum or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0):
                saved = checkpoint.save_checkpoint(learner, run_dir, step + 1, {"config": config_lib.to_dict(cfg)},
                                                   keep=cfg.checkpoint.keep)
            if signum:
                raise preempted("sft", signum, run_dir, saved, step + 1, steps, announce=learner.rank == 0)
        if history and cfg.checkpoint.final and (not cfg.checkpoint.every or steps % cfg.checkpoint.every):
            # The end of the run is a checkpoint (checkpoint.every 0: only there) unless checkpoint.final is off.
            checkpoint.save_checkpoint(learner, run_dir, steps, {"config": config_lib.to_dict(cfg)},
                                       keep=cfg.checkpoint.keep)
    if cfg.checkpoint.export:
        checkpoint.export_hf(learner, run_dir / run_folder.EXPORT)
    return history


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_lib.add_arguments(parser, SFTConfig)  # --output, --overwrite, --resume, --allow-changes among them


def main(args: argparse.Namespace) -> int:
    from medvl_engine.trainers.distributed import shutdown
    from medvl_engine.trainers.preemption import Preempted, exit_code

    cfg = config_lib.from_args(SFTConfig, args)
    try:
        history = run(cfg)
    except Preempted as stop:  # SIGTERM or Ctrl-C, after a checkpoint: 143 or 130
        return exit_code(stop, "sft")
    shutdown()  # after an error the other ranks are stopped by the launcher; a barrier would hang them
    if history and not math.isfinite(history[-1]["loss"]):
        return 1
    return 0
