"""The learner's config: one small dataclass per component, composed into `SFTConfig` and `GRPOConfig`.

Defaults reproduce MedVLThinker's recipe (verl GRPO and TRL SFT settings of its train/ scripts).
Every field is a command-line flag (`medvl_engine.config`): `--algo.clip-high 0.28` gives DAPO's
clip-higher, `--algo.advantage drgrpo --algo.loss-agg seq-mean-token-sum-norm` Dr. GRPO,
`--rollout.dynamic-sampling` drops groups whose rewards are all equal, `--algo.kl-type k1` another KL
estimator, `--algo.loss gspo` GSPO (sequence-level ratios), `--algo.rollout-is token` truncated
importance sampling against the engine's log-probs (`--algo.tis-cap 2.0` its old spelling),
`--algo.rollout-rs geometric --algo.rollout-rs-threshold 1.001` rejection of answers whose policies
drifted apart. `deepspeed_config(...)` turns the components into DeepSpeed's JSON config.
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


# The loss's own clip range and aggregation where the config leaves them out: PPO's 0.2 (verl's
# clip_ratio), GSPO's 3e-4 / 4e-4 and seq-mean-token-mean (arXiv:2507.18071 sec. 5.1; verl's
# examples/gspo_trainer recipes and compute_policy_loss_gspo).
LOSS_DEFAULTS = {"ppo": (0.2, 0.2, "token-mean"), "gspo": (3e-4, 4e-4, "seq-mean-token-mean")}
ROLLOUT_IS_THRESHOLD = 2.0  # verl's default rollout_is_threshold


@dataclass
class AlgoConfig:
    """The GRPO objective and its variants.

    Rollout correction (verl's `algorithm.rollout_correction`, decoupled mode): three policies,
    pi_rollout (the engine that sampled the answers; its log-probs travel with each group), pi_old (the
    learner's recomputation before the update, `old_logp recompute`) and pi_theta; the loss's ratio
    handles old -> theta, rollout_is / rollout_rs handle rollout -> old from rho = pi_old / pi_rollout
    (`medvl_engine.trainers.rollout_correction`). With `old_logp engine` (verl's bypass mode) pi_old is
    pi_rollout: every rho is 1, so both are refused there; the loss's ratio pi_theta / pi_rollout then is
    the whole correction. `tis_cap C` is the old spelling of `rollout_is token, rollout_is_threshold C`.
    """

    prompts_per_step: int = param(256, "questions (groups) consumed per step")
    mini_batches: int = param(2, "optimizer steps per GRPO step (MedVLThinker: 256 prompts in 2 x 128)")
    advantage: Literal["grpo", "drgrpo", "rloo"] = param("grpo", "group advantage estimator")
    loss: Literal["ppo", "gspo"] = param(
        "ppo", "policy loss: ppo clips one ratio per token (GRPO as MedVLThinker ran it); gspo (GSPO, verl's "
        "loss_mode=gspo) one ratio per answer, the geometric mean of its token ratios, with its own clip range "
        "and seq-mean-token-mean aggregation unless set, and no dual-clip")
    clip_low: float | None = param(None, "clip below 1 (none: the loss's own, 0.2 for ppo, 3e-4 for gspo)")
    clip_high: float | None = param(None, "clip above 1 (DAPO clip-higher: 0.28; none: the loss's own, 0.2 for ppo, "
                                    "4e-4 for gspo)")
    clip_ratio_c: float | None = param(3.0, "dual-clip PPO: a negative-advantage token's loss is capped at -A * c "
                                       "(verl's default, so MedVLThinker's runs); none: off; ppo only (verl's "
                                       "GSPO has none)")
    kl_coef: float = param(0.01, "KL loss coefficient against the initial policy (0: no reference model)")
    kl_type: Literal["low_var_kl", "k1", "k2"] = param("low_var_kl", "KL estimator")
    entropy_coef: float = param(0.0, "entropy bonus coefficient")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] | None = param(
        None, "token losses: mean over tokens, mean of sequence means, or Dr. GRPO's sums / max length (none: "
        "the loss's own, token-mean for ppo, seq-mean-token-mean for gspo)")
    old_logp: Literal["recompute", "engine"] = param(
        "recompute", "old log-probs: recomputed by the learner before the update, or the engine's (then the "
        "old policy is the rollout policy: no rollout_is / rollout_rs, the loss's ratio corrects against it)")
    rollout_is: Literal["none", "token", "sequence"] = param(
        "none", "rollout correction, importance sampling: weight each token's policy loss by pi_old / pi_rollout "
        "(token), or each answer's by the product over its tokens (sequence), truncated at rollout_is_threshold; "
        "needs old_logp recompute (with engine the weights are all 1)")
    rollout_is_threshold: float | None = param(
        None, f"cap of the importance weights, >= 1 (none: {ROLLOUT_IS_THRESHOLD} with rollout_is)")
    rollout_rs: Literal["none", "token", "sequence", "geometric"] = param(
        "none", "rollout correction, rejection: drop from the loss tokens (token) or answers (sequence: the "
        "product of their ratios pi_old / pi_rollout; geometric: its per-token geometric mean) whose ratio lies "
        "outside [rollout_rs_threshold_lower, rollout_rs_threshold]; needs old_logp recompute")
    rollout_rs_threshold: float | None = param(None, "rollout_rs: the upper bound of the accepted ratio, >= 1 "
                                               "(required with rollout_rs)")
    rollout_rs_threshold_lower: float | None = param(None, "rollout_rs: the lower bound, in (0, 1] (none: 1 / "
                                                     "rollout_rs_threshold)")
    tis_cap: float = param(0.0, "alias: tis_cap C is rollout_is token with rollout_is_threshold C (0: off)")
    epsilon: float = param(1e-6, "advantage std epsilon")
    max_draw_factor: int = param(8, "a step draws at most this many times prompts_per_step prompts, then stops "
                                 "the run (every group dropped: all answers score the same, or all fail)")

    def __post_init__(self):
        check_at_least("algo", self, 1, "prompts_per_step", "mini_batches", "max_draw_factor")
        if self.prompts_per_step % self.mini_batches:
            raise ConfigError(f"algo.prompts_per_step ({self.prompts_per_step}) must be divisible by "
                              f"algo.mini_batches ({self.mini_batches})")
        low, high, agg = LOSS_DEFAULTS[self.loss]
        self.clip_low = low if self.clip_low is None else self.clip_low
        self.clip_high = high if self.clip_high is None else self.clip_high
        self.loss_agg = agg if self.loss_agg is None else self.loss_agg
        check_finite("algo", self, "clip_low", "clip_high", "clip_ratio_c", "kl_coef", "entropy_coef", "tis_cap",
                     "epsilon")
        check_at_least("algo", self, 0, "clip_low", "clip_high", "kl_coef", "entropy_coef", "tis_cap")
        if not self.clip_low < 1:
            raise ConfigError(f"algo.clip_low: must be < 1 (the ratio is clipped to [1 - clip_low, 1 + clip_high]), "
                              f"got {self.clip_low}")
        if self.clip_high < self.clip_low:
            raise ConfigError(f"algo.clip_high ({self.clip_high}) is below algo.clip_low ({self.clip_low}): the ratio "
                              "is clipped to [1 - clip_low, 1 + clip_high], and clip-higher (DAPO) raises clip_high")
        if self.clip_ratio_c is not None and not self.clip_ratio_c > 1:
            raise ConfigError(f"algo.clip_ratio_c: must be > 1 (or none: off), got {self.clip_ratio_c}")
        if not self.epsilon > 0:
            raise ConfigError(f"algo.epsilon: must be > 0, got {self.epsilon}")
        self._check_rollout_correction()

    def _check_rollout_correction(self) -> None:
        """Fold the `tis_cap` alias into rollout_is, fill the thresholds' defaults, refuse what cannot work."""
        alias = bool(self.tis_cap)
        if alias:
            if self.rollout_is != "none":
                raise ConfigError(f"algo.tis_cap={self.tis_cap} is the old spelling of algo.rollout_is=token with "
                                  f"algo.rollout_is_threshold={self.tis_cap}, and algo.rollout_is={self.rollout_is} "
                                  "is given too: give only rollout_is")
            if self.rollout_is_threshold is not None:
                raise ConfigError(f"algo.tis_cap={self.tis_cap} and algo.rollout_is_threshold="
                                  f"{self.rollout_is_threshold} are the old and the new spelling of one cap: give "
                                  "only rollout_is token with rollout_is_threshold")
            self.rollout_is, self.rollout_is_threshold, self.tis_cap = "token", self.tis_cap, 0.0
        check_finite("algo", self, "rollout_is_threshold", "rollout_rs_threshold", "rollout_rs_threshold_lower")
        if self.rollout_is == "none":
            if self.rollout_is_threshold is not None:
                raise ConfigError(f"algo.rollout_is_threshold={self.rollout_is_threshold} caps importance weights, "
                                  "but algo.rollout_is is none: set rollout_is token or sequence, or drop the cap")
        else:
            if self.rollout_is_threshold is None:
                self.rollout_is_threshold = ROLLOUT_IS_THRESHOLD
            if not self.rollout_is_threshold >= 1:
                raise ConfigError(f"algo.{'tis_cap' if alias else 'rollout_is_threshold'}: must be >= 1 (a cap below 1 "
                                  "truncates the weight 1 of a token both policies agree on), got "
                                  f"{self.rollout_is_threshold}")
        if self.rollout_rs == "none":
            given = [k for k in ("rollout_rs_threshold", "rollout_rs_threshold_lower") if getattr(self, k) is not None]
            if given:
                raise ConfigError(f"algo.{given[0]}={getattr(self, given[0])} bounds rejection sampling, but "
                                  "algo.rollout_rs is none: set rollout_rs token, sequence or geometric")
        else:
            upper, lower = self.rollout_rs_threshold, self.rollout_rs_threshold_lower
            if upper is None:
                raise ConfigError(f"algo.rollout_rs={self.rollout_rs} needs algo.rollout_rs_threshold, the upper "
                                  "bound of the accepted ratio pi_old / pi_rollout (verl has no default either)")
            lower = 1.0 / upper if lower is None and upper > 0 else lower
            if not (upper >= 1 and lower is not None and 0 < lower <= 1 and lower < upper):
                raise ConfigError(f"algo.rollout_rs_threshold_lower={lower}, algo.rollout_rs_threshold={upper}: the "
                                  "accepted ratios [lower, upper] must hold 1 (answers both policies agree on) and "
                                  "more: need 0 < lower <= 1 <= upper, lower < upper")
            self.rollout_rs_threshold_lower = lower
        if self.old_logp == "engine" and self.rollout_correction:
            key = "rollout_is" if self.rollout_is != "none" else "rollout_rs"
            given = f"algo.tis_cap={self.rollout_is_threshold}" if alias else f"algo.{key}={getattr(self, key)}"
            key = "tis_cap" if alias else key
            raise ConfigError(f"{given} corrects pi_rollout -> pi_old, but with "
                              "algo.old_logp=engine the engine's log-probs are the old policy: pi_old == pi_rollout, "
                              "every importance weight is 1 and nothing is ever rejected (the loss's ratio "
                              "pi_theta / pi_rollout already corrects against the engine, verl's bypass mode). Use "
                              f"algo.old_logp=recompute, or drop algo.{key}")

    @property
    def rollout_correction(self) -> bool:
        """Whether importance weights or rejection act on the loss (and the rollout_corr/ metrics are logged)."""
        return self.rollout_is != "none" or self.rollout_rs != "none"


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
