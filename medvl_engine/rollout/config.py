"""The one rollout configuration: which questions (`DataConfig`) and how they are answered (`RolloutConfig`).

Every command that generates answers composes these two sections, so their flags read the same
everywhere (`--data.source`, `--rollout.n`, `--rollout.temperature`, ...): `grpo` (colocated or with
rollout workers), `rollout-worker`, `eval` and `passrate`. A command changes a default by giving the
section its own default instance (`field(default_factory=lambda: RolloutConfig(n=1, temperature=0.0))`)
and `--help` shows that command's real defaults.

    cfg = RolloutConfig(n=8, temperature=1.0, max_response_tokens=1024)
    backend = make_rollout_backend(cfg, model_path)
    params = cfg.sampling_params(logprobs=True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from medvl_engine.config import param
from medvl_engine.errors import ConfigError

Dtype = Literal["auto", "bf16", "fp16", "fp32"]


@dataclass
class DataConfig:
    """Which questions, and in what order (the prompt stream's source)."""

    source: str = param("bundled", "`bundled`, a hub name, a save_to_disk folder, a parquet or a jsonl file")
    split: str = param("train", "split to read when the source has several")
    subset: list[str] = param(factory=list, help="only these dataset_name values (empty: all)")
    text_only: bool = param(False, "keep only questions without images (for text-only models)")
    ignore_images: bool = param(False, "keep every question but drop its images (MedVLThinker's --ignore_image)")
    skip_invalid: bool = param(False, "skip (and report) rows that do not fit the schema instead of failing")
    max_samples: int = param(0, "use only the first N questions, in dataset order, after the filters (0: all)")
    shuffle: bool = param(True, "shuffle every epoch with `seed` (off: dataset order, e.g. a curated easy-to-hard set)")
    seed: int = param(42, "shuffle seed: the order of epoch e is a function of (seed, e) only")

    def __post_init__(self):
        if not self.source:
            raise ConfigError("data.source: may not be empty")
        if self.max_samples < 0:
            raise ConfigError(f"data.max_samples: must be >= 0, got {self.max_samples}")
        if self.text_only and self.ignore_images:
            raise ConfigError("data.text_only drops the questions with images and data.ignore_images keeps them "
                              "without their images: set one of them")
        if self.seed < 0:
            raise ConfigError(f"data.seed: must be >= 0, got {self.seed}")


@dataclass
class RolloutConfig:
    """How answers are generated: the engine, the sampling, and the bounds of the RolloutPool."""

    backend: Literal["hf", "sglang", "vllm"] = param("hf", "generation engine")
    n: int = param(8, "answers per question (the GRPO group size)")
    temperature: float = param(1.0, "sampling temperature (0: greedy)")
    top_p: float = param(1.0, "nucleus sampling")
    top_k: int = param(-1, "top-k sampling (-1: off)")
    max_prompt_tokens: int = param(2048, "a longer prompt is an error, never truncated (MedVLThinker)")
    max_response_tokens: int = param(4096, "answer length cap (new tokens)")
    seed: int = param(0, "sampling seed: stream position k samples with a seed derived from (seed, k)")
    engine_seed: int = param(0, "the engine's own seed (vLLM's `seed`), for what a request's seed does not cover; "
                                "each request samples with its stream position's seed")
    max_in_flight: int = param(16, "groups in flight per backend")
    max_staleness: int = param(1, "answers come from weights at most k versions behind the learner")
    dynamic_sampling: bool = param(False, "drop groups whose rewards are all equal and draw more (DAPO)")
    retries: int = param(2, "retries of a failed or timed-out generation before the prompt is reported failed")
    timeout_s: float = param(0.0, "per-attempt generation timeout in seconds (0: none)")
    dtype: Dtype = param("auto", "weights' precision in the engine (auto: the checkpoint's)")
    device: str = param("auto", "hf backend: torch device (auto: cuda when there is one, else cpu)")
    max_batch: int = param(16, "hf backend: sequences per generate call")
    threads: int = param(0, "hf backend: torch CPU threads (0: torch's choice)")
    tp_size: int = param(1, "sglang backend: tensor-parallel size")
    mem_fraction_static: float = param(0.0, "sglang/vllm: memory share for weights and KV cache (0: the engine's)")

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError(f"rollout.n: must be >= 1, got {self.n}")
        if not self.temperature >= 0:
            raise ConfigError(f"rollout.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p: must be in (0, 1], got {self.top_p}")
        if self.top_k < 1 and self.top_k != -1:
            raise ConfigError(f"rollout.top_k: must be -1 (off) or >= 1, got {self.top_k}")
        for name in ("max_prompt_tokens", "max_response_tokens", "max_in_flight", "max_batch", "tp_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"rollout.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "engine_seed", "max_staleness", "retries", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"rollout.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("temperature", "timeout_s"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"rollout.{name}: must be a finite number, got {getattr(self, name)}")
        if not self.timeout_s >= 0:
            raise ConfigError(f"rollout.timeout_s: must be >= 0, got {self.timeout_s}")
        if not 0 <= self.mem_fraction_static < 1:
            raise ConfigError(f"rollout.mem_fraction_static: must be in [0, 1), got {self.mem_fraction_static}")
        if self.dynamic_sampling and self.n < 2:
            raise ConfigError(f"rollout.dynamic_sampling drops groups whose rewards are all equal: it needs "
                              f"rollout.n >= 2 (got {self.n}: every group would be dropped)")
        if self.n > 1:
            self.require_sampling(f"rollout.n={self.n} answers would be the same text n times; or set rollout.n 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def require_sampling(self, why: str) -> None:
        """The one refusal of greedy decoding where a command needs different answers; `why` says what for."""
        if self.greedy:
            raise ConfigError(f"rollout.temperature 0 (greedy): {why}; sample (temperature > 0)")

    def require_full_distribution(self, why: str) -> None:
        """The one refusal of top-p/top-k where answers are trained on (GRPO and its rollout workers).

        The learner takes the sampled tokens as drawn from its policy, `softmax(logits / T)` over the whole
        vocabulary, and recomputes their log-probs that way; a truncated draw is another distribution, and
        the engines' log-probs of it disagree with the learner's (vLLM's processed log-probs renormalise
        over the kept tokens; the hf sampler's are the untruncated ones). Making it exact means the learner
        renormalising over the engine's kept set, which it cannot rebuild from bf16 logits that differ from
        the engine's. Eval, pass-rate and data building keep top_p/top_k."""
        cut = [f"rollout.{key} {value}" for key, value, off in (("top_p", self.top_p, 1.0), ("top_k", self.top_k, -1))
               if value != off]
        if cut:
            raise ConfigError(f"{', '.join(cut)}: {why}, but truncated sampling draws from another distribution "
                              "than the learner's full-vocabulary log_softmax(logits / T) (its log-probs and the "
                              "engine's would differ); set rollout.top_p 1 and rollout.top_k -1")

    def sampling_params(self, *, logprobs: bool):
        """The SamplingParams every request shares; each request brings its own seed (the prompt stream's).
        `logprobs` asks for the engine's log-probs of the sampled tokens, which only training uses: it
        refuses top-p/top-k (`require_full_distribution`), also for a caller whose config did not."""
        from medvl_engine.rollout.types import SamplingParams

        if logprobs:
            self.require_full_distribution("answers with log-probs are trained on")

        return SamplingParams(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=self.max_response_tokens, return_logprobs=logprobs)


def torch_dtype(dtype: str):
    """The torch dtype of a config's `dtype` (None for `auto`)."""
    if dtype == "auto":
        return None
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]


def max_images(samples) -> int:
    """The most images one question of `samples` carries (an engine's per-prompt image limit)."""
    return max((len(s.images) for s in samples), default=0)


def make_rollout_backend(cfg: RolloutConfig, model_path: str, *, max_images: int = 0, colocated: bool = False):
    """The backend `cfg` names, loaded from the Hugging Face folder `model_path`; `max_images` is the most
    images a prompt will carry (vLLM reserves room for that many per prompt); `colocated` says the engine
    shares its accelerators with a learner (SGLang then starts with its memory saver)."""
    from medvl_engine.rollout.backend import make_backend

    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    if cfg.backend == "vllm":
        return make_backend("vllm", model_path, dtype=names.get(cfg.dtype, "auto"), seed=cfg.engine_seed,
                            max_model_len=cfg.max_prompt_tokens + cfg.max_response_tokens, max_images=max_images,
                            **({"gpu_memory_utilization": cfg.mem_fraction_static} if cfg.mem_fraction_static else {}))

    if cfg.backend == "hf":
        if cfg.threads:
            import torch

            torch.set_num_threads(cfg.threads)
        device = cfg.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {"device": device, "max_batch": cfg.max_batch}
        if cfg.dtype != "auto":
            kwargs["dtype"] = torch_dtype(cfg.dtype)
        return make_backend("hf", model_path, **kwargs)
    kwargs = {"tp_size": cfg.tp_size, "colocated": colocated}
    if cfg.mem_fraction_static:
        kwargs["mem_fraction_static"] = cfg.mem_fraction_static
    if cfg.dtype != "auto":
        kwargs["dtype"] = names[cfg.dtype]
    return make_backend("sglang", model_path, **kwargs)


def open_rollout(cfg: RolloutConfig, model: str, samples=(), *, colocated: bool = False, device: str | None = None):
    """The one way every command opens its engine: resolve `model` (a folder, or a name of the embedded
    models), build the backend `cfg` names with room for the most images one of `samples` carries, and
    the tokenizer/processor whose chat template renders its prompts. Returns (backend, renderer, path).
    `device` overrides an hf backend's `auto` device (colocated GRPO puts it on the learner's)."""
    from dataclasses import replace

    from medvl_engine.models import resolve_model_path
    from medvl_engine.rollout.stream import backend_renderer

    if device is not None and cfg.backend == "hf" and cfg.device == "auto":
        cfg = replace(cfg, device=device)
    path = resolve_model_path(model)
    backend = make_rollout_backend(cfg, path, max_images=max_images(samples), colocated=colocated)
    return backend, backend_renderer(backend, path), path
