"""The learner's config: one small dataclass per component, composed into `SFTConfig` and `GRPOConfig`.

Defaults reproduce MedVLThinker's recipe (verl GRPO and TRL SFT settings of its train/ scripts).
Every field is a command-line flag (`medvl_engine.config`): `--algo.clip-high 0.28` gives DAPO's
clip-higher, `--algo.advantage drgrpo --algo.loss-agg seq-mean-token-sum-norm` Dr. GRPO,
`--rollout.dynamic-sampling` drops groups whose rewards are all equal, `--algo.kl-type k1` another KL
estimator, `--algo.tis-cap 2.0` the truncated importance-sampling correction with the engine's
log-probs. `deepspeed_config(...)` turns the components into DeepSpeed's JSON config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

from medvl_engine.config import param
from medvl_engine.errors import ConfigError
from medvl_engine.rollout.config import DataConfig, RolloutConfig

Dtype = Literal["bf16", "fp16", "fp32"]


def check_finite(section: str, obj, *names: str) -> None:
    """Refuse inf and nan (YAML's `.inf`, `.nan`) in the float fields `names`, naming key and value."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{_key(section, name)}: must be a finite number, got {value}")


def check_at_least(section: str, obj, bound: float, *names: str) -> None:
    """Refuse a field of `names` below `bound`, naming key and value."""
    for name in names:
        value = getattr(obj, name)
        if not value >= bound:
            raise ConfigError(f"{_key(section, name)}: must be >= {bound}, got {value}")


def _key(section: str, name: str) -> str:
    return f"{section}.{name}" if section else name


@dataclass
class ModelConfig:
    """The policy: a Hugging Face folder (or the embedded default `smollm2`)."""

    SHORTHAND = "path"  # `model: PATH` in a file, `--model PATH` on the command line: model.path

    path: str = param("", "model folder (config, tokenizer, weights) or `smollm2` for the embedded default")
    dtype: Dtype = param("bf16", "training precision (DeepSpeed bf16/fp16 or plain fp32)")
    gradient_checkpointing: bool = param(True, "recompute activations in backward (MedVLThinker: on)")
    attn_implementation: str = param("sdpa", "transformers attention implementation")
    fused_logprobs: bool = param(True, "answer log-probs from the final hidden states through the fused output "
                                 "head (the [B, L, V] logits never exist); off: full logits, then log-softmax")
    freeze_vision: bool = param(False, "the vision tower (patch embedding and blocks of an image-text model) gets no "
                                "gradient and no optimizer state; it stays as loaded and is still exported")
    freeze_merger: bool = param(False, "the merger (the projector from the vision tower into the language model: "
                                "Qwen2.5-VL's visual.merger) too; with freeze_vision, only the language model trains")
    packing: Literal["auto", "on", "off"] = param(
        "auto", "the answers of a micro-batch end to end in one row, no padding (position ids restart per answer, "
        "attention block-diagonal); auto: on with a varlen attention kernel (attn_implementation "
        "flash_attention_2/3), off otherwise (SDPA and eager build a [tokens, tokens] mask)")

    def __post_init__(self):
        if not self.attn_implementation:
            raise ConfigError("model.attn_implementation: may not be empty")

    @property
    def packing_on(self) -> bool:
        varlen = self.attn_implementation.startswith("flash_attention")
        return self.packing == "on" or (self.packing == "auto" and varlen)


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
        check_finite("optim", self, "lr", "weight_decay", "eps", "grad_clip", "warmup_ratio")
        if not self.lr > 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps: must be > 0, got {self.eps}")
        check_at_least("optim", self, 0, "weight_decay", "grad_clip")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: each must be in [0, 1), got {self.betas}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optim.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, micro-batch and offload: what DeepSpeed's JSON config holds beyond the optimizer."""

    zero_stage: int = param(1, "ZeRO stage 0-3 (3 shards parameters; weight sync then gathers bucket by bucket)")
    micro_batch_size: int = param(1, "sequences per forward/backward on each rank")
    offload_optimizer: bool = param(False, "keep optimizer states on the CPU (DeepSpeedCPUAdam)")
    backend: str = param("", "torch.distributed backend; empty: nccl on CUDA, gloo on the CPU")

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"deepspeed.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"deepspeed.micro_batch_size: must be >= 1, got {self.micro_batch_size}")


@dataclass
class TransportConfig:
    """Placement: the rollout in this process (no endpoint) or in worker processes streaming over ZeroMQ."""

    endpoint: str = param("", "ZeroMQ endpoint the learner listens on (ipc:// or tcp://); empty: colocated, "
                          "the rollout pool runs in this process")
    workers: int = param(1, "rollout worker processes the learner starts itself (0: they are started apart)")
    credits: int = param(0, "groups a worker may have sent and not yet consumed (0: one step's worth)")
    weight_sync: Literal["auto", "memory", "disk", "distributed"] = param(
        "auto", "auto: memory when colocated, disk with an endpoint; memory: into the in-process backend; "
        "disk: an HF folder per version, announced to the workers; distributed: broadcast from the learner's "
        "rank 0 over a torch.distributed group the workers join (nccl on GPUs, gloo on the CPU), bucket by "
        "bucket, no copy through disk (split placement, workers this learner starts, hf or sglang backend)")
    sync_bucket_mb: int = param(512, "bucket size of a weight push, MB")
    sync_address: str = param("127.0.0.1", "weight_sync=distributed: the address the rollout workers reach the "
                              "learner's rank 0 at (the weight group's rendezvous; written into their config files)")
    sync_port: int = param(0, "weight_sync=distributed: the rendezvous port of the weight group on the learner's "
                           "rank 0 (0: a free port, written into the workers' config files)")
    sync_backend: Literal["gloo", "nccl"] = param(
        "gloo", "weight_sync=distributed: the weight group's torch.distributed backend; gloo: any device (GPU "
        "tensors pass through host memory); nccl: GPU to GPU, every rank on a GPU of its own (the learner's rank 0 "
        "and the workers' engines must not share one: NCCL refuses two ranks on one device)")
    keys: str = param("", "folder of the run's CURVE keys (`medvl-engine keys DIR --workers N`; empty: "
                      "$MEDVL_TRANSPORT_KEYS): every tcp endpoint needs them, loopback included")
    insecure: bool = param(False, "UNSAFE: tcp without CURVE keys: any process that reaches the port (on loopback: "
                           "any local user's) is let in and may speak for any worker; ipc needs no keys (its "
                           "socket file is owner-only)")
    shards: int = param(0, "rollout workers the prompt stream is split between, rollout-0 ... rollout-{N-1}, worker "
                        "K answering positions K mod N (0: transport.workers, at least 1); set it for workers "
                        "started apart (transport.workers 0)")
    liveness_timeout_s: float = param(60.0, "a worker this learner started whose heartbeats (every 2 s) stop this "
                                      "long (a stopped or hung process) is killed and restarted")
    max_restarts: int = param(3, "restarts of each worker this learner started before the run stops, naming it")

    def __post_init__(self):
        check_at_least("transport", self, 0, "workers", "credits", "shards", "max_restarts")
        if not self.liveness_timeout_s > 0:
            raise ConfigError(f"transport.liveness_timeout_s: must be > 0, got {self.liveness_timeout_s}")
        if self.workers and self.shards and self.shards != self.workers:
            raise ConfigError(f"transport.shards={self.shards}: the {self.workers} workers this learner starts are "
                              "the shards (set shards only with transport.workers 0)")
        if self.sync_bucket_mb < 1:
            raise ConfigError(f"transport.sync_bucket_mb: must be >= 1, got {self.sync_bucket_mb}")
        if not 0 <= self.sync_port <= 65535:
            raise ConfigError(f"transport.sync_port: must be a port in [0, 65535] (0: a free one), "
                              f"got {self.sync_port}")
        if self.weight_sync == "distributed" and not self.sync_address:
            raise ConfigError("transport.sync_address: weight_sync=distributed needs the address the workers "
                              "reach the learner at")
        if not self.endpoint:
            if self.workers != 1:
                raise ConfigError(f"transport.workers={self.workers} starts rollout worker processes: it needs "
                                  "transport.endpoint (without one the rollout runs in the learner's process)")
            if self.credits:
                raise ConfigError("transport.credits bounds what rollout workers send: it needs transport.endpoint")
            if self.weight_sync in ("disk", "distributed"):
                raise ConfigError(f"transport.weight_sync={self.weight_sync} sends weights to rollout worker "
                                  "processes: it needs transport.endpoint (colocated, the rollout runs in this "
                                  "process and weights move in memory)")
        elif self.weight_sync == "distributed" and self.workers == 0:
            raise ConfigError("transport.weight_sync=distributed forms its torch.distributed group with the "
                              "rollout workers this learner starts: it needs transport.workers >= 1 (workers "
                              "started apart: use disk)")
        elif self.weight_sync == "memory":
            raise ConfigError(f"transport.weight_sync=memory pushes weights into a backend in this process, but "
                              f"with transport.endpoint={self.endpoint!r} the rollout runs in worker processes: "
                              "use disk (or auto)")

    @property
    def colocated(self) -> bool:
        return not self.endpoint

    @property
    def num_shards(self) -> int:
        return self.shards or max(self.workers, 1)

    @property
    def sync_kind(self) -> str:
        if self.weight_sync != "auto":
            return self.weight_sync
        return "memory" if self.colocated else "disk"


@dataclass
class AlgoConfig:
    """The GRPO objective and its variants."""

    prompts_per_step: int = param(256, "questions (groups) consumed per step")
    mini_batches: int = param(2, "optimizer steps per GRPO step (MedVLThinker: 256 prompts in 2 x 128)")
    advantage: Literal["grpo", "drgrpo", "rloo"] = param("grpo", "group advantage estimator")
    clip_low: float = param(0.2, "PPO clip below 1")
    clip_high: float = param(0.2, "PPO clip above 1 (DAPO clip-higher: 0.28)")
    clip_ratio_c: float | None = param(3.0, "dual-clip PPO: a negative-advantage token's loss is capped at -A * c "
                                       "(verl's default, so MedVLThinker's runs); none: off")
    kl_coef: float = param(0.01, "KL loss coefficient against the initial policy (0: no reference model)")
    kl_type: Literal["low_var_kl", "k1", "k2"] = param("low_var_kl", "KL estimator")
    entropy_coef: float = param(0.0, "entropy bonus coefficient")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = param(
        "token-mean", "token losses: mean over tokens, mean of sequence means, or Dr. GRPO's sums / max length")
    old_logp: Literal["recompute", "engine"] = param(
        "recompute", "old log-probs: recomputed by the learner before the update, or the engine's")
    tis_cap: float = param(0.0, "truncated importance-sampling weight cap on exp(old - engine) (0: off)")
    epsilon: float = param(1e-6, "advantage std epsilon")
    max_draw_factor: int = param(8, "a step draws at most this many times prompts_per_step prompts, then stops "
                                 "the run (every group dropped: all answers score the same, or all fail)")

    def __post_init__(self):
        check_at_least("algo", self, 1, "prompts_per_step", "mini_batches", "max_draw_factor")
        if self.prompts_per_step % self.mini_batches:
            raise ConfigError(f"algo.prompts_per_step ({self.prompts_per_step}) must be divisible by "
                              f"algo.mini_batches ({self.mini_batches})")
        check_finite("algo", self, "clip_low", "clip_high", "clip_ratio_c", "kl_coef", "entropy_coef", "tis_cap",
                     "epsilon")
        check_at_least("algo", self, 0, "clip_low", "clip_high", "kl_coef", "entropy_coef", "tis_cap")
        if self.clip_high < self.clip_low:
            raise ConfigError(f"algo.clip_high ({self.clip_high}) is below algo.clip_low ({self.clip_low}): the ratio "
                              "is clipped to [1 - clip_low, 1 + clip_high], and clip-higher (DAPO) raises clip_high")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ConfigError(f"algo.clip_ratio_c: must be > 1 (or none: off), got {self.clip_ratio_c}")
        if not self.epsilon > 0:
            raise ConfigError(f"algo.epsilon: must be > 0, got {self.epsilon}")
        if self.tis_cap and self.old_logp == "engine":
            raise ConfigError("algo.tis_cap corrects recomputed old log-probs towards the engine's: "
                              "it needs algo.old_logp=recompute")


# sink -> the package it needs (its extra has the same name)
METRIC_SINKS = {"jsonl": "", "tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass
class LoggingConfig:
    """What the run reports and how often (the run folder is the top-level `output`)."""

    log_every: int = param(1, "print a metrics line every k steps")
    rollouts: bool = param(True, "GRPO: append every trained answer to rollouts.jsonl (off for very large runs)")
    sinks: str = param("jsonl", "where the per-step metrics go, comma-separated: jsonl (metrics.jsonl, always "
                       "written: resume and `report` read it), tensorboard (output/tensorboard; extra "
                       "[tensorboard]), wandb (output/wandb, offline unless WANDB_API_KEY or WANDB_MODE is set; "
                       "extra [wandb])")
    wandb_project: str = param("medvl-engine", "W&B project")
    wandb_name: str = param("", "W&B run name (empty: the run folder's name)")

    def __post_init__(self):
        import importlib.util

        if self.log_every < 1:
            raise ConfigError(f"logging.log_every: must be >= 1, got {self.log_every}")
        unknown = [s for s in self.sink_names if s not in METRIC_SINKS]
        if unknown:
            raise ConfigError(f"logging.sinks: unknown sink(s) {unknown} (choose from {', '.join(METRIC_SINKS)})")
        for sink in self.sink_names:
            # Checked here, before any model loads: a run that cannot log where it was told is an error now,
            # not after its first step.
            if METRIC_SINKS[sink] and importlib.util.find_spec(METRIC_SINKS[sink]) is None:
                raise ConfigError(f"logging.sinks: {sink} needs the `{METRIC_SINKS[sink]}` package, which is not "
                                  f"installed: pip install 'medvl-engine[{sink}]'")

    @property
    def sink_names(self) -> tuple[str, ...]:
        """The sinks, `jsonl` first and always present."""
        names = [s.strip() for s in self.sinks.split(",") if s.strip()]
        return ("jsonl", *dict.fromkeys(s for s in names if s != "jsonl"))


def parse_step_range(text: str, key: str = "profile.steps") -> tuple[int, int] | None:
    """`"A-B"` (or `"A"`, one step) as (A, B): 1-based steps, A <= B; empty: None."""
    text = text.strip()
    if not text:
        return None
    first, sep, last = text.partition("-")
    try:
        bounds = (int(first), int(last) if sep else int(first))
    except ValueError:
        raise ConfigError(f"{key}: expected steps as A-B or A (e.g. 3-5), got {text!r}") from None
    if bounds[0] < 1:
        raise ConfigError(f"{key}: steps count from 1 (as in metrics.jsonl), got {text!r}")
    if bounds[1] < bounds[0]:
        raise ConfigError(f"{key}: the range {text!r} ends before it starts")
    return bounds


@dataclass
class ProfileConfig:
    """torch.profiler traces of chosen steps, and the per-step timeline of the run's stages."""

    steps: str = param("", "record these steps with torch.profiler: A-B or A (1-based, as in metrics.jsonl; empty: "
                       "none); one Chrome trace per rank, trace-rank{R}.json, for chrome://tracing or Perfetto")
    dir: str = param("", "folder of the traces (empty: output/profile)")
    record_shapes: bool = param(False, "record the input shapes of every op (larger trace, slower steps)")
    profile_memory: bool = param(False, "record tensor allocations (larger trace, slower steps)")
    timeline: bool = param(True, "GRPO: write timeline.jsonl, the wall-clock spans of every step's stages and of "
                           "the rollout's generation (a few lines per step); `medvl-engine report` draws it")

    def __post_init__(self):
        parse_step_range(self.steps)

    @property
    def step_range(self) -> tuple[int, int] | None:
        return parse_step_range(self.steps)


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints and the final Hugging Face export."""

    every: int = param(0, "save a DeepSpeed checkpoint every k steps (0: only at the end, see checkpoint.final)")
    keep: int = param(2, "checkpoints kept (older ones are deleted)")
    export: bool = param(True, "export the final policy as a Hugging Face folder")
    final: bool = param(True, "save a DeepSpeed checkpoint at the end of the run (the one `--resume` continues "
                        "from); off: only the export remains of a finished run")

    def __post_init__(self):
        check_at_least("checkpoint", self, 0, "every")
        check_at_least("checkpoint", self, 1, "keep")


@dataclass
class TrainingRun:
    """The run folder of `grpo` and `sft`, and how a run treats an earlier one there (as `eval`, `passrate`,
    `curate` and `build-data` name theirs: `output`, `overwrite`)."""

    # One release of the old spelling (`logging.run_dir`, `--logging.run-dir`), with a warning.
    RENAMED = {"logging.run_dir": "output"}

    output: str = param("runs/latest", "run folder: config.yaml, metrics.jsonl, checkpoints, export")
    # Switches of this invocation, not settings of the run: never saved into config.yaml (so
    # `--config RUN/config.yaml` starts a run, it does not resume one) and free to change on resume.
    overwrite: bool = param(False, "replace an earlier run in the run folder (only a folder medvl-engine wrote)",
                            saved=False)
    resume: bool = param(False, "continue from the run folder's latest checkpoint", saved=False)
    allow_changes: bool = param(False, "with --resume: continue even though settings differ from the run folder's "
                                "config.yaml (the changes are printed; steps, logging, checkpoint cadence and "
                                "worker placement may always change)", saved=False)

    def __post_init__(self):
        if not self.output:
            raise ConfigError("output: may not be empty (the run folder)")


@dataclass
class GRPOConfig(TrainingRun):
    """A GRPO run: MedVLThinker's RL recipe by default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    steps: int = param(100, "GRPO steps to run")
    seed: int = param(0, "learner seed (python, numpy, torch)")

    def __post_init__(self):
        super().__post_init__()
        if self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        self.rollout.require_sampling("GRPO's n answers per question would be equal and give no advantage")
        self.rollout.require_full_distribution("GRPO trains on the sampled answers")
        if self.rollout.n < 2:
            raise ConfigError(f"rollout.n={self.rollout.n}: the advantage of a group of one answer is always 0; "
                              "GRPO needs rollout.n >= 2")
        if (self.transport.sync_kind == "distributed" and self.transport.sync_backend == "nccl"
                and self.rollout.backend == "hf" and self.rollout.device == "cpu"):
            raise ConfigError("transport.sync_backend=nccl: the hf backend runs on the CPU (rollout.device cpu); "
                              "NCCL moves GPU tensors only, use gloo")
        if self.transport.weight_sync == "distributed" and self.rollout.backend == "vllm":
            raise ConfigError("transport.weight_sync=distributed: the vllm backend cannot receive weights over "
                              "torch.distributed; use transport.weight_sync disk (or rollout.backend hf or sglang)")
        steps = self.profile.step_range
        if steps and steps[0] > self.steps:
            raise ConfigError(f"profile.steps {self.profile.steps}: the run has {self.steps} steps, none of them "
                              "would be recorded")


@dataclass
class SFTConfig(TrainingRun):
    """An SFT run on reasoning traces: MedVLThinker's TRL settings by default."""

    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-5, weight_decay=1e-4, betas=(0.9, 0.95), schedule="cosine", warmup_ratio=0.05))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    epochs: int = param(5, "passes over the data")
    global_batch_size: int = param(16, "sequences per optimizer step over all ranks")
    max_tokens: int = param(4096, "longer examples are an error, not truncated")
    max_steps: int = param(0, "stop after this many optimizer steps (0: run all epochs)")
    target: Literal["reasoning", "answer"] = param(
        "reasoning", "reasoning: MedVLThinker's multiple-choice prompt and `<think>...</think><answer>X</answer>` "
        "target; answer: free-form VQA (the question alone, the answer text), e.g. build-data's sft.jsonl")
    seed: int = param(0, "learner seed (python, numpy, torch)")

    def __post_init__(self):
        super().__post_init__()
        check_at_least("", self, 1, "epochs", "global_batch_size", "max_tokens")
        check_at_least("", self, 0, "max_steps")
        steps = self.profile.step_range
        if steps and self.max_steps and steps[0] > self.max_steps:
            raise ConfigError(f"profile.steps {self.profile.steps}: the run stops after max_steps={self.max_steps}, "
                              "none of them would be recorded")


def with_switches(cfg, **switches: bool | None):
    """`cfg` with the run switches given (not None) set: `run(cfg, resume=True)` as `--resume` would."""
    given = {name: value for name, value in switches.items() if value is not None}
    return dataclasses.replace(cfg, **given) if given else cfg


def deepspeed_config(optim: OptimConfig, ds: DeepSpeedConfig, dtype: str, *, train_batch_size: int,
                     world_size: int, total_steps: int) -> dict:
    """DeepSpeed's JSON config from the components.

    `train_batch_size` sequences per optimizer step over all ranks; gradient accumulation makes up
    the difference to micro_batch_size x world_size.
    """
    per_step = ds.micro_batch_size * world_size
    if train_batch_size % per_step:
        raise ConfigError(f"train batch of {train_batch_size} sequences is not a multiple of "
                          f"deepspeed.micro_batch_size ({ds.micro_batch_size}) x {world_size} ranks")
    warmup = int(round(optim.warmup_ratio * total_steps))
    if optim.schedule == "constant" and warmup == 0:
        scheduler = None  # DeepSpeed's WarmupLR rejects 0 warmup steps; no scheduler keeps lr fixed
    elif optim.schedule == "constant":
        scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                                                    "warmup_num_steps": warmup, "warmup_type": "linear"}}
    else:
        # DeepSpeed's WarmupCosineLR rejects 0 warmup steps (a short run: 0.05 x 8 steps rounds to 0); one
        # "warmup" step that starts at the full rate is no warmup.
        scheduler = {"type": "WarmupCosineLR", "params": {"total_num_steps": max(total_steps, 1),
                                                          "warmup_num_steps": max(warmup, 1),
                                                          "warmup_min_ratio": 0.0 if warmup else 1.0,
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
