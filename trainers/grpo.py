"""`medvl-engine grpo`: GRPO with DeepSpeed on the rollout stream, weights pushed back after every step.

One step (`GRPOTrainer.step`):

    groups = source.next(prompts_per_step)            scored groups in stream order (in-process pool or workers)
    batch = RolloutBatch.from_groups(groups)          collate: prompt + answer sequences, answer masks
    advantages = group_advantages(rewards, groups)    GRPO / Dr. GRPO / RLOO, per answer
    old / reference log-probs                         recomputed before any update (or the engine's)
    rollout correction (when on)                      importance weights, rejection: engine vs old log-probs
    for each mini-batch: forward, token_logprobs, policy_loss (PPO or GSPO), backward, optimizer step
    version += 1; sync.push(learner, version)         new weights reach the rollout backends
    metrics                                           reward, accuracy, format rate, KL, tokens/s

Every stage is a named range (`medvl_engine.profiling.stage`); `--profile.steps 3-5` records those steps
with torch.profiler (profile/trace-rank{R}.json), and every step's stages and the generation spans of
its groups go to timeline.jsonl (`--no-profile.timeline`: off), drawn by `medvl-engine report`.

    medvl-engine grpo --model.path smollm2 --steps 4 --algo.prompts-per-step 4 --rollout.n 4
    torchrun --nproc_per_node 2 -m medvl_engine.cli grpo --config grpo.yaml --transport.endpoint tcp://0.0.0.0:5555
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medvl_engine import config as config_lib
from medvl_engine import run_folder
from medvl_engine.errors import ConfigError
from medvl_engine.profiling import StepProfiler, Timeline, stage
from medvl_engine.progress import Progress
from medvl_engine.trainers.config import GRPOConfig, with_switches
from medvl_engine.trainers.learner import MicroBatch
from medvl_engine.trainers.rollout_batch import RolloutBatch
from medvl_engine.trainers.rollout_correction import RolloutCorrection

# Statistics summed over a mini-batch's micro-batches (the token-weighted ones are divided by tokens at the end).
SUM_KEYS = ("tokens", "loss", "kl", "approx_kl", "clip_frac", "dual_clip_frac", "entropy")

TABLE_COLUMNS = ("step", "version", "reward", "accuracy", "format", "kl", "clip_frac", "response_len",
                 "tokens_per_s", "seconds")


@dataclass
class PolicyMicroBatch:
    """One forward pass of the update, with everything its loss needs."""

    micro: MicroBatch
    advantages: torch.Tensor  # [B] per answer
    weight: float  # this micro-batch's share of its mini-batch's loss, times accumulation steps x ranks
    engine_logp: torch.Tensor | None = None
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    is_weights: torch.Tensor | None = None  # rollout correction: [B, T] per token or [B] per answer
    loss_mask: torch.Tensor | None = None  # rollout correction: the answer mask less the rejected tokens

    @property
    def mask(self) -> torch.Tensor:
        """The tokens that carry loss: the answers', less those rollout correction rejected."""
        return self.micro.mask if self.loss_mask is None else self.loss_mask


def _logp_diff(learner_logp: torch.Tensor, engine_logp: torch.Tensor | None, mask: torch.Tensor) -> torch.Tensor:
    """[sum, max, tokens] of |learner - engine| over the answer tokens (zeros without engine log-probs)."""
    if engine_logp is None:
        return torch.zeros(3, dtype=torch.float64, device=mask.device)
    diff = (learner_logp - engine_logp).abs() * mask
    return torch.stack([diff.sum().double(), diff.max().double(), mask.sum().double()])


class GRPOTrainer:
    def __init__(self, cfg: GRPOConfig, learner, source, sync, *, version: int = 0, step: int = 0, timeline=None):
        self.cfg = cfg
        self.learner = learner
        self.source = source
        self.sync = sync
        self.version = version
        self.step_index = step
        self.timeline = timeline  # a profiling.Timeline: each step's stages and the groups' generation spans
        self.correction = RolloutCorrection.from_algo(cfg.algo)  # None: off
        self.last_groups: list = []

    # -- the step -------------------------------------------------------------------------------------

    def step(self) -> dict:
        from medvl_engine.kernels import group_advantages

        algo = self.cfg.algo
        spans: list = []  # (stage, start, end) of this step on the learner, wall clock, for the timeline
        start = time.perf_counter()
        with stage("grpo_step"):
            with stage("rollout_wait", spans):
                groups = self.source.next(algo.prompts_per_step, self.version)
            self.last_groups = groups
            received = time.perf_counter()
            with stage("collate", spans):
                self.source.release_memory()  # colocated: the engine's memory goes to the update
                batch = RolloutBatch.from_groups(groups, max_prompt_tokens=self.cfg.rollout.max_prompt_tokens,
                                                 max_response_tokens=self.cfg.rollout.max_response_tokens,
                                                 processor=self.learner.processor)
                advantages, constant = group_advantages(batch.rewards, batch.group_index, mode=algo.advantage,
                                                        eps=algo.epsilon)
                minis = [self.micro_batches(batch, advantages, idx) for idx in batch.mini_batches(algo.mini_batches)]
            with stage("logprobs", spans):
                diff = self.fill_logprobs(minis)
                correction = self.correct_rollouts(minis) if self.correction else None
            with stage("update", spans):
                stats = [self.train_mini_batch(mini, first=k == 0) for k, mini in enumerate(minis)]
            trained = time.perf_counter()
            self.version += 1
            self.step_index += 1
            with stage("weight_sync", spans):
                self.source.resume_memory()  # before the push: the engine loads the new weights into it
                sync = self.sync.push(self.learner, self.version)
        self.write_timeline(spans)
        return self.metrics(batch, constant, stats, diff, sync, start=start, received=received, trained=trained,
                            correction=correction)

    def write_timeline(self, spans: list) -> None:
        """This step's learner stages and the generation spans of the groups it drew (kept or dropped), per producer."""
        generated = self.source.take_generation_spans()
        if self.timeline is None:
            return
        self.timeline.write(self.step_index, "learner", spans)
        for producer, start, end in generated:
            who = producer if producer.startswith("rollout") else f"rollout-{producer}"
            self.timeline.write(self.step_index, who, [("generate", start, end)])
        self.timeline.flush()

    def micro_batches(self, batch: RolloutBatch, advantages: torch.Tensor, indices: np.ndarray) -> list:
        """This rank's share of one mini-batch, in micro-batches, each weighted by its share of the loss."""
        learner = self.learner
        mine = batch.shard(indices, learner.rank, learner.world_size)
        size = self.cfg.deepspeed.micro_batch_size
        lengths = batch.response_lengths
        per_token = self.cfg.algo.loss_agg == "token-mean"
        total = float(lengths[indices].sum()) if per_token else float(len(indices))
        out = []
        for i in range(0, len(mine), size):
            idx = mine[i : i + size]
            micro = batch.micro_batch(idx, learner.tokenizer.pad_token_id)
            units = float(lengths[idx].sum()) if per_token else float(len(idx))
            # engine.backward divides by the accumulation steps, ranks average their gradients: this
            # weight makes the update the loss over the whole mini-batch, however it is split.
            weight = units / total * learner.gradient_accumulation_steps * learner.world_size
            engine_logp = batch.engine_logprob_tensor(idx, micro)
            out.append(PolicyMicroBatch(micro.to(learner.device), advantages[idx].to(learner.device), weight,
                                        engine_logp=None if engine_logp is None else engine_logp.to(learner.device)))
        if len(out) != learner.gradient_accumulation_steps:
            raise ValueError(f"{len(out)} micro-batches per rank but DeepSpeed accumulates "
                             f"{learner.gradient_accumulation_steps}")
        return out

    @torch.no_grad()
    def fill_logprobs(self, minis: list[list[PolicyMicroBatch]]) -> torch.Tensor:
        """Old log-probs with the weights before any update of this step, reference log-probs for the KL.

        Returns [diff sum, diff max, tokens] of |engine - learner| log-probs of the sampled tokens before
        the update, on the device (verl's rollout-probs-diff: the first thing to read when RL misbehaves).
        """
        algo = self.cfg.algo
        temperature = self.cfg.rollout.temperature
        diff = torch.zeros(3, dtype=torch.float64, device=self.learner.device)
        for mini in minis:
            for pm in mini:
                if algo.old_logp == "engine":
                    if pm.engine_logp is None:
                        raise ConfigError("algo.old_logp=engine but the rollout groups carry no engine log-probs")
                    pm.old_logp = pm.engine_logp
                else:
                    with stage("old_logprobs"):
                        pm.old_logp = self.learner.response_logprobs(pm.micro, temperature=temperature)
                    diff += _logp_diff(pm.old_logp, pm.engine_logp, pm.micro.mask)
                if algo.kl_coef > 0:
                    with stage("ref_logprobs"):
                        pm.ref_logp = self.learner.response_logprobs(pm.micro, temperature=temperature,
                                                                     reference=True)
        return diff

    def correct_rollouts(self, minis: list[list[PolicyMicroBatch]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Rollout correction (`medvl_engine.trainers.rollout_correction`) from the old and the engine's log-probs:
        each micro-batch's importance weights and rejection mask. With rejection, each micro-batch's share of
        its mini-batch's loss is recounted over what was kept (`recount_shares`). Returns the step's (sums,
        extrema) of the `rollout_corr/` statistics, on the device."""
        stats = self.correction.apply(pm for mini in minis for pm in mini)
        if self.correction.rs_level and self.cfg.algo.loss_agg != "seq-mean-token-sum-norm":  # Dr. GRPO: constant
            self.recount_shares(minis)
        return stats

    def recount_shares(self, minis: list[list[PolicyMicroBatch]]) -> None:
        """Each micro-batch's `weight` from the tokens (token-mean) or answers (seq-mean-token-mean) rejection
        kept, over the whole mini-batch on every rank; one host synchronisation for the step."""
        learner = self.learner
        per_token = self.cfg.algo.loss_agg == "token-mean"
        units = torch.stack([torch.stack([(pm.mask.sum() if per_token else pm.mask.any(-1).sum()).double()
                                          for pm in mini]) for mini in minis])  # [minis, micro-batches]
        totals = units.sum(1)
        if learner.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        scale = learner.gradient_accumulation_steps * learner.world_size
        # A mini-batch whose every token was rejected passes no gradient (its micro-batches' losses are 0).
        shares = torch.where(totals[:, None] > 0, units / totals.clamp_min(1)[:, None], 0.0) * scale
        for mini, row in zip(minis, shares.tolist()):
            for pm, weight in zip(mini, row):
                pm.weight = weight

    def train_mini_batch(self, mini: list[PolicyMicroBatch], *, first: bool = False) -> dict:
        """One optimizer step over `mini`; its statistics accumulate on the device and are read once."""
        from medvl_engine.kernels import policy_loss

        algo = self.cfg.algo
        learner = self.learner
        sums = torch.zeros(len(SUM_KEYS), dtype=torch.float64, device=learner.device)
        ratio_dev = torch.zeros((), dtype=torch.float64, device=learner.device)
        diff = torch.zeros(3, dtype=torch.float64, device=learner.device)
        with_entropy = algo.entropy_coef > 0
        for pm in mini:
            mask = pm.mask
            with stage("forward"):
                out = learner.response_logprobs(pm.micro, temperature=self.cfg.rollout.temperature,
                                                return_entropy=with_entropy)
            logp, entropy = out if isinstance(out, tuple) else (out, None)
            advantages = pm.advantages
            if pm.is_weights is not None:
                # verl multiplies each token's clipped policy loss by its (constant) weight w >= 0: the same as
                # weighting its advantage, since max(-wA r, -wA clip(r)) = w max(-A r, -A clip(r)).
                weights = pm.is_weights
                advantages = advantages * weights if weights.dim() == 1 else advantages[:, None] * weights
            with stage("loss"):
                loss, metrics = policy_loss(logp, pm.old_logp, advantages, mask, ref_logp=pm.ref_logp,
                                            clip_low=algo.clip_low, clip_high=algo.clip_high, kl_coef=algo.kl_coef,
                                            kl_type=algo.kl_type, agg=algo.loss_agg,
                                            # verl's GSPO has no dual-clip
                                            clip_ratio_c=None if algo.loss == "gspo" else algo.clip_ratio_c,
                                            loss=algo.loss)
                if algo.loss_agg == "seq-mean-token-sum-norm":
                    # The kernel divides by the padded width (prompt included); Dr. GRPO divides by a
                    # constant, the configured maximum answer length.
                    loss = loss * (logp.shape[-1] / self.cfg.rollout.max_response_tokens)
                if entropy is not None:
                    loss = loss - algo.entropy_coef * (entropy * mask).sum() / mask.sum().clamp_min(1)
            with stage("backward"):
                learner.backward(loss * pm.weight)
            with stage("optimizer_step"):
                learner.step()
            with torch.no_grad():
                tokens = mask.sum().double()
                zero = torch.zeros((), dtype=torch.float64, device=learner.device)
                row = [tokens, loss.detach().double() * (pm.weight / learner.gradient_accumulation_steps)]
                row += [metrics[k].double() * tokens if k in metrics else zero for k in SUM_KEYS[2:6]]
                row.append((entropy.detach() * mask).sum().double() if entropy is not None else zero)
                sums += torch.stack(row)
                ratio = torch.exp(logp.detach() - pm.old_logp)
                ratio_dev = torch.maximum(ratio_dev, ((ratio - 1).abs() * mask).max().double())
                if first and algo.old_logp == "engine":
                    # Before the first optimizer step these are the learner's log-probs of the rollout's weights.
                    diff += _logp_diff(logp.detach(), pm.engine_logp, mask)
        # The one host synchronisation of this mini-batch: every statistic (and the gradient norm) at once.
        norm = learner.engine.get_global_grad_norm()
        host = torch.cat([sums, ratio_dev[None], diff,
                          torch.as_tensor([float("nan") if norm is None else norm], dtype=torch.float64,
                                          device=learner.device)]).tolist()
        out = dict(zip(SUM_KEYS, host))
        out["ratio_dev"] = host[len(SUM_KEYS)]
        out["diff"] = host[len(SUM_KEYS) + 1 : len(SUM_KEYS) + 4]
        out["grad_norm"] = host[-1]
        out["entropy_computed"] = with_entropy
        return out

    # -- metrics --------------------------------------------------------------------------------------

    def metrics(self, batch: RolloutBatch, constant: torch.Tensor, stats: list[dict], diff: torch.Tensor,
                sync: dict, *, start: float, received: float, trained: float,
                correction: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        totals = torch.tensor([[s[k] for k in SUM_KEYS] for s in stats], dtype=torch.float64).sum(0)
        # |engine - learner| parts as [sum, max, tokens]: from before the update (recomputed old log-probs)
        # and from the first mini-batch (engine log-probs used as old ones); one of the two is zeros.
        parts = [diff.tolist()] + [s["diff"] for s in stats]
        diff = torch.tensor([sum(p[0] for p in parts), sum(p[2] for p in parts)], dtype=torch.float64)
        maxima = torch.tensor([stats[0]["ratio_dev"], max(p[1] for p in parts)], dtype=torch.float64)
        if self.learner.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
            dist.all_reduce(diff)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            if correction is not None:
                dist.all_reduce(correction[0])
                dist.all_reduce(correction[1], op=dist.ReduceOp.MAX)
        t = dict(zip(SUM_KEYS, totals.tolist()))
        tokens = max(t["tokens"], 1.0)
        diff_tokens = float(diff[1])
        response_tokens = int(batch.response_lengths.sum())
        seconds = time.perf_counter() - start
        row = {
            "step": self.step_index,
            "version": self.version,
            "reward": float(batch.rewards.mean()),
            "accuracy": float(batch.correct.float().mean()),
            "format": float(batch.format_ok.float().mean()),
            "constant_groups": float(constant.float().mean()),
            "kl": t["kl"] / tokens,
            "approx_kl": t["approx_kl"] / tokens,
            "clip_frac": t["clip_frac"] / tokens,
            "dual_clip_frac": t["dual_clip_frac"] / tokens,
            "loss": t["loss"] / len(stats),
            # Step-0 consistency: before any update the PPO ratio of the first mini-batch is exactly 1.
            "first_ratio_max_dev": float(maxima[0]),
            # |engine - learner| log-probs of the sampled tokens before the update (verl: rollout-probs-diff).
            "logp_diff_mean": float(diff[0]) / diff_tokens if diff_tokens else float("nan"),
            "logp_diff_max": float(maxima[1]) if diff_tokens else float("nan"),
            "grad_norm": stats[-1]["grad_norm"],
            "lr": self.learner.lr(),
            "staleness": float((self.version - 1 - batch.weight_versions).float().mean()),
            "groups": batch.num_groups,
            "images": batch.num_images,
            "response_len": float(batch.response_lengths.float().mean()),
            "response_tokens": response_tokens,
            "tokens_per_s": response_tokens / max(seconds, 1e-9),  # end to end: sampling overlaps training
            "rollout_wait_s": received - start,
            "train_s": trained - received,
            "sync_s": sync.get("sync_seconds", 0.0),
            "seconds": seconds,
        }
        if stats[0]["entropy_computed"]:
            row["entropy"] = t["entropy"] / tokens
        if correction is not None:
            row.update(self.correction.metrics(correction[0].tolist(), correction[1].tolist()))
        row.update(self.source.stats_row())
        return row

    # -- checkpoints ----------------------------------------------------------------------------------

    def client_state(self) -> dict:
        return {"weight_version": self.version, "source": self.source.state(),
                "config": config_lib.to_dict(self.cfg)}


def table_row(row: dict, header: bool) -> str:
    """The step's row of the printed table (with the column names and rule above it for the first)."""
    from medvl_engine.benchmarking import format_table

    lines = format_table([row], TABLE_COLUMNS).splitlines()
    return "\n".join(lines if header else lines[2:])


def run(cfg: GRPOConfig, *, resume: bool | None = None, overwrite: bool | None = None,
        allow_changes: bool | None = None, feed=None, sync=None, on_step=None) -> list[dict]:
    """Train `cfg.steps` steps (from the last checkpoint with `cfg.resume`); returns the per-step metrics.
    SIGTERM or Ctrl-C stops it after the step in flight, with a checkpoint: `preemption.Preempted`.

    `resume`, `overwrite`, `allow_changes` override the config's switches of the same names when given.

    `feed` and `sync` default to the configured placement: a RolloutPool in this process with weights
    pushed in memory, or rollout workers over `transport.endpoint` with weights through disk.
    """
    from medvl_engine.trainers import checkpoint
    from medvl_engine.trainers.distributed import seed_everything
    from medvl_engine.trainers.learner import Learner
    from medvl_engine.trainers.metrics import MetricsLog, RolloutLog
    from medvl_engine.trainers.placement import build_source, make_weight_sync
    from medvl_engine.trainers.preemption import StopAfterStep, preempted

    cfg = with_switches(cfg, resume=resume, overwrite=overwrite, allow_changes=allow_changes)
    resume = cfg.resume
    checkpoint.prepare_run_dir(cfg.output, resume=resume, overwrite=cfg.overwrite,
                               config=config_lib.to_dict(cfg), allow_changes=cfg.allow_changes)
    seed_everything(cfg.seed)
    algo = cfg.algo
    groups_per_mini = algo.prompts_per_step // algo.mini_batches
    learner = Learner.build(cfg.model, cfg.optim, cfg.deepspeed, train_batch_size=groups_per_mini * cfg.rollout.n,
                            total_steps=cfg.steps * algo.mini_batches, reference=algo.kl_coef > 0,
                            fused_logprobs=cfg.model.fused_logprobs)
    run_dir = Path(cfg.output)
    state = checkpoint.load_checkpoint(learner, run_dir) if resume else None
    source = build_source(cfg, learner, state, feed=feed)
    if sync is None:
        sync = make_weight_sync(cfg, source)
    trainer = GRPOTrainer(cfg, learner, source, sync, version=state["weight_version"] if state else 0,
                          step=state["step"] if state else 0)
    if state:
        sync.push(learner, trainer.version)  # the samplers start from the restored weights
    if learner.rank == 0:
        config_lib.save(cfg, run_dir / run_folder.CONFIG)
    history = []
    resume_step = trainer.step_index if resume else None
    rollouts = RolloutLog(run_dir, learner.rank, enabled=cfg.logging.rollouts, resume_step=resume_step)
    trainer.timeline = Timeline(run_dir, learner.rank, resume_step=resume_step, enabled=cfg.profile.timeline)
    profiler = StepProfiler.from_config(cfg.profile, run_dir, learner.rank)
    bar = Progress(cfg.steps, "grpo", unit="step", initial=trainer.step_index, enabled=learner.rank == 0,
                   heartbeat=True)
    # SIGTERM / Ctrl-C: the step in flight finishes, a checkpoint follows, `Preempted` says where (preemption.py).
    # The handlers stay in place until the workers are stopped: a second signal meanwhile still exits at once.
    signals = StopAfterStep("grpo", run_dir, announce=learner.rank == 0, abort=lambda: _stop_worker_processes(source))
    with (signals, contextlib.closing(source),
          MetricsLog(run_dir, learner.rank, resume_step=resume_step, config=cfg) as log, rollouts, trainer.timeline,
          profiler, bar):
        while trainer.step_index < cfg.steps:
            profiler.begin(trainer.step_index + 1)
            row = trainer.step()
            profiler.end(row["step"])
            history.append(row)
            log.write(row)
            rollouts.write(row["step"], trainer.last_groups)
            bar.set_postfix(f"reward {row['reward']:.3f}")
            bar.update(1)
            if learner.rank == 0 and (row["step"] - 1) % cfg.logging.log_every == 0:
                bar.write(table_row(row, header=len(history) == 1))
            if on_step:
                on_step(trainer, row)
            # A signal during the last step lets the run end as usual (final checkpoint, export, exit 0).
            signum = signals.requested(learner.world_size, learner.device) if trainer.step_index < cfg.steps else 0
            if signum or (cfg.checkpoint.every and trainer.step_index % cfg.checkpoint.every == 0):
                saved = checkpoint.save_checkpoint(learner, run_dir, trainer.step_index, trainer.client_state(),
                                                   keep=cfg.checkpoint.keep)
            if signum:
                raise preempted("grpo", signum, run_dir, saved, trainer.step_index, cfg.steps,
                                announce=learner.rank == 0)
        last_saved = cfg.checkpoint.every and trainer.step_index % cfg.checkpoint.every == 0
        if history and cfg.checkpoint.final and not last_saved:
            # The end of the run is a checkpoint (checkpoint.every 0: only there) unless checkpoint.final is off.
            checkpoint.save_checkpoint(learner, run_dir, trainer.step_index, trainer.client_state(),
                                       keep=cfg.checkpoint.keep)
    if cfg.checkpoint.export:
        checkpoint.export_hf(learner, run_dir / run_folder.EXPORT)
    return history


def _stop_worker_processes(source) -> None:
    """After a second signal, before the learner exits at once: the rollout worker processes it started would
    outlive it (terminated, killed after 10 s). A colocated engine needs nothing: it ends with the process."""
    for worker in getattr(source.feed, "workers", ()):
        worker.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config_lib.add_arguments(parser, GRPOConfig)  # --output, --overwrite, --resume, --allow-changes among them


def main(args: argparse.Namespace) -> int:
    from medvl_engine.trainers.distributed import shutdown
    from medvl_engine.trainers.preemption import Preempted, exit_code

    cfg = config_lib.from_args(GRPOConfig, args)
    try:
        history = run(cfg)
    except Preempted as stop:  # SIGTERM or Ctrl-C, after a checkpoint: 143 or 130
        return exit_code(stop, "grpo")
    shutdown()  # after an error the other ranks are stopped by the launcher; a barrier would hang them
    return 0 if history and all(math.isfinite(r["loss"]) for r in history) else 1
