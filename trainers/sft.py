"""`medvl-engine sft`: supervised fine-tuning on reasoning traces with DeepSpeed.

Each example is the chat-templated prompt followed by MedVLThinker's target
`<think> {reasoning} </think>\\n<answer> {letter} </answer>` and the end-of-turn token; only the
target and its end-of-turn token carry loss. The loss is the mean over all target tokens of the
global batch (not a mean of per-micro-batch means), so it does not depend on how the batch is split
over ranks and micro-batches.

    medvl-engine sft --model smollm2 --data.source bundled --output runs/sft
    torchrun --nproc_per_node 8 -m medvl_engine.cli sft --config sft.yaml --deepspeed.zero-stage 3
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medvl_engine import config as config_lib
from medvl_engine import run_folder
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


def end_of_turn(tokenizer) -> str:
    """The text the chat template puts after an assistant message (ChatML: `<|im_end|>`)."""
    marker = "\x00MARK\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    tail = text.split(marker, 1)[1]
    return tail.rstrip("\n") or (tokenizer.eos_token or "")


def encode_example(tokenizer, sample, *, max_tokens: int, processor=None, target: str = "reasoning") -> SFTExample:
    """Prompt (chat template with the generation prompt) + target + end-of-turn, and where the loss starts.

    Prompt and target are tokenized apart so the loss boundary falls exactly between them (ChatML
    ends the prompt with "assistant\\n", a token boundary in every BPE vocabulary we use). An image row
    needs the `processor` of an image-text model: its placeholders are expanded as the engine would.
    """
    from medvl_engine.prompts import render_prompt, render_vqa_prompt, sft_target
    from medvl_engine.vision import expand_image_tokens

    if target == "answer":  # free-form VQA: the question alone, the answer text as the target
        prompt = render_vqa_prompt(processor or tokenizer, sample)
        target = sample.answer.strip() + end_of_turn(tokenizer)
    else:
        prompt = render_prompt(processor or tokenizer, sample)
        target = sft_target(sample) + end_of_turn(tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    vision: dict = {}
    if sample.images:
        if processor is None:
            raise ConfigError(f"SFT example {sample.dataset_name}[{sample.dataset_index}] has {len(sample.images)} "
                              "image(s) but the policy is a text-only model (set --data.text-only or "
                              "--data.ignore-images)")
        prompt_ids, vision = expand_image_tokens(prompt_ids, sample.images, processor)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = list(prompt_ids) + list(target_ids)
    if len(ids) > max_tokens:
        raise ConfigError(f"SFT example {sample.dataset_name}[{sample.dataset_index}]: {len(ids)} tokens "
                          f"> max_tokens {max_tokens} (raise --max-tokens; examples are never truncated)")
    return SFTExample(ids, len(prompt_ids), sample.dataset_index, vision)


def load_examples(cfg: SFTConfig, tokenizer, processor=None) -> list[SFTExample]:
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
    return [encode_example(tokenizer, s, max_tokens=cfg.max_tokens, processor=processor, target=cfg.target)
            for s in samples]


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, learner, examples: list[SFTExample]):
        self.cfg = cfg
        self.learner = learner
        self.examples = examples
        self.steps_per_epoch = len(examples) // cfg.global_batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(examples)} examples are fewer than one global batch ({cfg.global_batch_size})")
        self.total_steps = total_steps(cfg, len(examples))
        self.step_index = 0
        processor = learner.processor
        self.image_token = getattr(processor, "image_token_id", None) if processor is not None else None

    def batch(self, step: int) -> list[SFTExample]:
        epoch, offset = divmod(step, self.steps_per_epoch)
        # The one definition of data order (the prompt stream's): a function of (seed, epoch) only.
        order = epoch_order(len(self.examples), self.cfg.data.seed if self.cfg.data.shuffle else None, epoch)
        start = offset * self.cfg.global_batch_size
        return [self.examples[i] for i in order[start : start + self.cfg.global_batch_size]]

    def train_step(self, step: int) -> dict:
        with stage("sft_step"):
            return self._train_step(step)

    def _train_step(self, step: int) -> dict:
        from medvl_engine.trainers.learner import pad_sequences
        from medvl_engine.vision import batch_vision

        learner = self.learner
        batch = self.batch(step)
        per_rank = len(batch) // learner.world_size
        mine = batch[learner.rank * per_rank : (learner.rank + 1) * per_rank]
        total_tokens = sum(len(e.ids) - e.loss_start for e in batch)
        # engine.backward divides by the accumulation steps and the gradients are averaged over ranks:
        # scaling the token sum by gas * world / total_tokens makes the update the global token mean.
        scale = learner.gradient_accumulation_steps * learner.world_size / total_tokens
        micro_size = self.cfg.deepspeed.micro_batch_size
        loss_sum = 0.0
        start = time.perf_counter()
        for i in range(0, len(mine), micro_size):
            chunk = mine[i : i + micro_size]
            micro = pad_sequences([e.ids for e in chunk], [e.loss_start for e in chunk],
                                  learner.tokenizer.pad_token_id)
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
    """Train; returns the per-step metrics (also written to output/metrics.jsonl on rank 0).

    `resume`, `overwrite`, `allow_changes` override the config's switches of the same names when given.
    """
    from medvl_engine.trainers import checkpoint
    from medvl_engine.trainers.distributed import seed_everything
    from medvl_engine.trainers.learner import Learner
    from medvl_engine.trainers.metrics import MetricsLog
    from medvl_engine.trainers.model import load_processor, load_tokenizer

    cfg = with_switches(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    resume = cfg.resume
    checkpoint.prepare_run_dir(cfg.output, resume=resume, overwrite=cfg.overwrite,
                               config=config_lib.to_dict(cfg), allow_changes=cfg.allow_changes)
    seed_everything(cfg.seed)
    examples = load_examples(cfg, load_tokenizer(cfg.model.path), load_processor(cfg.model.path))
    steps = total_steps(cfg, len(examples))
    learner = Learner.build(cfg.model, cfg.optim, cfg.deepspeed, train_batch_size=cfg.global_batch_size,
                            total_steps=steps, fused_logprobs=cfg.model.fused_logprobs)
    trainer = SFTTrainer(cfg, learner, examples)
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
    with MetricsLog(run_dir, learner.rank, resume_step=start if resume else None, config=cfg) as log, profiler, bar:
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
            if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0:
                checkpoint.save_checkpoint(learner, run_dir, step + 1, {"config": config_lib.to_dict(cfg)},
                                           keep=cfg.checkpoint.keep)
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

    cfg = config_lib.from_args(SFTConfig, args)
    history = run(cfg)
    shutdown()  # after an error the other ranks are stopped by the launcher; a barrier would hang them
    if history and not math.isfinite(history[-1]["loss"]):
        return 1
    return 0
