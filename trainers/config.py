"""The learner's config: one small dataclass per component, composed into `SFTConfig` and `GRPOConfig`.

Defaults reproduce MedVLThinker's recipe (verl GRPO and TRL SFT settings of its train/ scripts).
Every field is a command-line flag (`medvl_engine.config`): `--algo.clip-high 0.28` gives DAPO's
clip-higher, `--algo.advantage drgrpo --algo.loss-agg seq-mean-token-sum-norm` Dr. GRPO,
`--algo.dynamic-sampling` drops groups whose rewards are all equal, `--algo.kl-type k1` another KL
estimator, `--algo.tis-cap 2.0` the truncated importance-sampling correction with the engine's
log-probs. `deepspeed_config(...)` turns the components into DeepSpeed's JSON config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medvl_engine.config import param

Dtype = Literal["bf16", "fp16", "fp32"]


@dataclass
class ModelConfig:
    """The policy: a Hugging Face folder (or the embedded default `smollm2`)."""

    path: str = param("", "model folder (config, tokenizer, weights) or `smollm2` for the embedded default")
    dtype: Dtype = param("bf16", "training precision (DeepSpeed bf16/fp16 or plain fp32)")
    gradient_checkpointing: bool = param(True, "recompute activations in backward (MedVLThinker: on)")
    attn_implementation: str = param("sdpa", "transformers attention implementation")

    def __post_init__(self):
        if not self.attn_implementation:
            raise ValueError("model.attn_implementation: may not be empty")


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = param(1e-6, "peak learning rate")
    weight_decay: float = param(0.01, "AdamW weight decay")
    betas: tuple[float, float] = param((0.9, 0.999), "AdamW betas")
    eps: float = param(1e-8, "AdamW epsilon")
    grad_clip: float = param(1.0, "clip the global gradient norm to this (0: off)")
    schedule: Literal["constant", "cosine"] = param("constant", "learning-rate schedule")
    warmup_ratio: float = param(0.0, "fraction of the steps with a linear warmup")

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay: must be >= 0, got {self.weight_decay}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas: each must be in [0, 1), got {self.betas}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip: must be >= 0, got {self.grad_clip}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"optim.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, micro-batch and offload: what DeepSpeed's JSON config holds beyond the optimizer."""

    zero_stage: int = param(1, "ZeRO stage 0-3 (3 shards parameters; weight sync then gathers bucket by bucket)")
    micro_batch_size: int = param(1, "sequences per forward/backward on each rank")
    offload_optimizer: bool = param(False, "keep optimizer states on the CPU (DeepSpeedCPUAdam)")
    backend: str = param("", "torch.distributed backend; empty: nccl on CUDA, gloo on the CPU")

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 1:
            raise ValueError(f"deepspeed.micro_batch_size: must be >= 1, got {self.micro_batch_size}")


@dataclass
class DataConfig:
    """Where the questions come from and in what order."""

    source: str = param("bundled", "`bundled`, a dataset folder, a parquet or a jsonl file")
    split: str = param("train", "split to read when the source has several")
    seed: int = param(42, "shuffle seed (the order is a function of seed and epoch only)")
    max_samples: int = param(0, "use only the first N samples after shuffling (0: all)")
    shuffle: bool = param(True, "shuffle every epoch")
    text_only: bool = param(False, "keep only questions without images (for text-only models)")

    def __post_init__(self):
        if not self.source:
            raise ValueError("data.source: may not be empty")
        if self.max_samples < 0:
            raise ValueError(f"data.max_samples: must be >= 0, got {self.max_samples}")


@dataclass
class RolloutConfig:
    """How answers are sampled and how new weights reach the samplers."""

    backend: Literal["hf", "sglang"] = param("hf", "rollout backend of the workers")
    n: int = param(8, "answers per question (the GRPO group size)")
    temperature: float = param(1.0, "sampling temperature")
    top_p: float = param(1.0, "nucleus sampling")
    max_prompt_tokens: int = param(2048, "longer prompts are an error, not truncated (MedVLThinker)")
    max_response_tokens: int = param(4096, "answer length cap")
    endpoint: str = param("", "ZeroMQ endpoint the learner listens on (ipc:// or tcp://); empty: in-process")
    weights_endpoint: str = param("", "ZeroMQ endpoint where weight versions are announced")
    workers: int = param(1, "rollout worker processes the learner starts itself (0: they are started apart)")
    credits: int = param(0, "groups a worker may have in flight (0: one step's worth)")
    max_staleness: int = param(1, "drop groups sampled more than k versions behind the learner")
    weight_sync: Literal["memory", "disk", "distributed"] = param(
        "disk", "memory: same-process hf backend; disk: HF folder + announce; distributed: NCCL broadcast")
    sync_bucket_mb: int = param(512, "bucket size of a distributed weight push, MB")
    seed: int = param(0, "sampling seed of the workers")

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"rollout.n: must be >= 1, got {self.n}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature: must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p: must be in (0, 1], got {self.top_p}")
        for name in ("max_prompt_tokens", "max_response_tokens", "sync_bucket_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_staleness < 0 or self.workers < 0 or self.credits < 0:
            raise ValueError("rollout.max_staleness, rollout.workers and rollout.credits must be >= 0")


@dataclass
class AlgoConfig:
    """The GRPO objective and its variants."""

    prompts_per_step: int = param(256, "questions (groups) consumed per step")
    mini_batches: int = param(2, "optimizer steps per GRPO step (MedVLThinker: 256 prompts in 2 x 128)")
    advantage: Literal["grpo", "drgrpo", "rloo"] = param("grpo", "group advantage estimator")
    clip_low: float = param(0.2, "PPO clip below 1")
    clip_high: float = param(0.2, "PPO clip above 1 (DAPO clip-higher: 0.28)")
    kl_coef: float = param(0.01, "KL loss coefficient against the initial policy (0: no reference model)")
    kl_type: Literal["low_var_kl", "k1", "k2"] = param("low_var_kl", "KL estimator")
    entropy_coef: float = param(0.0, "entropy bonus coefficient")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = param(
        "token-mean", "token losses: mean over tokens, mean of sequence means, or Dr. GRPO's sums / max length")
    dynamic_sampling: bool = param(False, "drop groups whose rewards are all equal (DAPO)")
    old_logp: Literal["recompute", "engine"] = param(
        "recompute", "old log-probs: recomputed by the learner before the update, or the engine's")
    tis_cap: float = param(0.0, "truncated importance-sampling weight cap on exp(old - engine) (0: off)")
    epsilon: float = param(1e-6, "advantage std epsilon")

    def __post_init__(self):
        if self.prompts_per_step < 1 or self.mini_batches < 1:
            raise ValueError("algo.prompts_per_step and algo.mini_batches must be >= 1")
        if self.prompts_per_step % self.mini_batches:
            raise ValueError(f"algo.prompts_per_step ({self.prompts_per_step}) must be divisible by "
                             f"algo.mini_batches ({self.mini_batches})")
        if self.clip_low < 0 or self.clip_high < 0:
            raise ValueError("algo.clip_low and algo.clip_high must be >= 0")
        if self.kl_coef < 0 or self.entropy_coef < 0 or self.tis_cap < 0:
            raise ValueError("algo.kl_coef, algo.entropy_coef and algo.tis_cap must be >= 0")
        if self.tis_cap and self.old_logp == "engine":
            raise ValueError("algo.tis_cap corrects recomputed old log-probs towards the engine's: "
                             "it needs algo.old_logp=recompute")


@dataclass
class LoggingConfig:
    """Where the run writes and how often it reports."""

    run_dir: str = param("runs/latest", "run folder: config, metrics.jsonl, checkpoints, export")
    log_every: int = param(1, "print a metrics line every k steps")

    def __post_init__(self):
        if not self.run_dir:
            raise ValueError("logging.run_dir: may not be empty")
        if self.log_every < 1:
            raise ValueError(f"logging.log_every: must be >= 1, got {self.log_every}")


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints and the final Hugging Face export."""

    every: int = param(0, "save a DeepSpeed checkpoint every k steps (0: only at the end)")
    keep: int = param(2, "checkpoints kept (older ones are deleted)")
    export: bool = param(True, "export the final policy as a Hugging Face folder")

    def __post_init__(self):
        if self.every < 0 or self.keep < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep >= 1")


@dataclass
class GRPOConfig:
    """A GRPO run: MedVLThinker's RL recipe by default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    steps: int = param(100, "GRPO steps to run")
    seed: int = param(0, "learner seed (torch, numpy, python)")

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps: must be >= 1, got {self.steps}")


@dataclass
class SFTConfig:
    """An SFT run on reasoning traces: MedVLThinker's TRL settings by default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-5, weight_decay=1e-4, betas=(0.9, 0.95), schedule="cosine", warmup_ratio=0.05))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    epochs: int = param(5, "passes over the data")
    global_batch_size: int = param(16, "sequences per optimizer step over all ranks")
    max_tokens: int = param(4096, "longer examples are an error, not truncated")
    max_steps: int = param(0, "stop after this many optimizer steps (0: run all epochs)")
    seed: int = param(0, "learner seed")

    def __post_init__(self):
        if self.epochs < 1 or self.global_batch_size < 1 or self.max_tokens < 1 or self.max_steps < 0:
            raise ValueError("epochs, global_batch_size and max_tokens must be >= 1, max_steps >= 0")


def deepspeed_config(optim: OptimConfig, ds: DeepSpeedConfig, dtype: str, *, train_batch_size: int,
                     world_size: int, total_steps: int) -> dict:
    """DeepSpeed's JSON config from the components.

    `train_batch_size` sequences per optimizer step over all ranks; gradient accumulation makes up
    the difference to micro_batch_size x world_size.
    """
    per_step = ds.micro_batch_size * world_size
    if train_batch_size % per_step:
        raise ValueError(f"train batch of {train_batch_size} sequences is not a multiple of "
                         f"deepspeed.micro_batch_size ({ds.micro_batch_size}) x {world_size} ranks")
    warmup = int(round(optim.warmup_ratio * total_steps))
    if optim.schedule == "constant" and warmup == 0:
        scheduler = None  # DeepSpeed's WarmupLR rejects 0 warmup steps; no scheduler keeps lr fixed
    elif optim.schedule == "constant":
        scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear"}}
    else:
        scheduler = {"type": "WarmupCosineLR", "params": {"total_num_steps": max(total_steps, 1),
                                                          "warmup_num_steps": warmup, "warmup_min_ratio": 0.0,
                                                          "cos_min_ratio": 0.0, "warmup_type": "linear"}}
    zero: dict = {"stage": ds.zero_stage}
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    if ds.zero_stage == 3:
        # Export and weight sync gather full tensors themselves, bucket by bucket.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    config = {
        "train_batch_size": train_batch_size,
        "train_micro_batch_size_per_gpu": ds.micro_batch_size,
        "gradient_accumulation_steps": train_batch_size // per_step,
        "gradient_clipping": optim.grad_clip,
        "optimizer": {"type": "AdamW", "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
                                                  "weight_decay": optim.weight_decay,
                                                  # torch's AdamW on the GPU too; offload needs DeepSpeedCPUAdam
                                                  "torch_adam": not zero.get("offload_optimizer")}},
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if scheduler:
        config["scheduler"] = scheduler
    return config
