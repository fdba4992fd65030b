"""Loading the policy and its tokenizer (model names resolve through `medvl_engine.models`)."""

from __future__ import annotations

import torch

from medvl_engine.errors import ConfigError
from medvl_engine.models import EMBEDDED_DEFAULT, cache_dir, resolve_model_path  # noqa: F401 (re-exported)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """The model at `path` in `dtype` ("bf16", "fp16" or "fp32"): an image-text model (the
    `AutoModelForImageTextToText` family, e.g. Qwen2.5-VL) when the checkpoint has a vision tower, a causal
    LM otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from medvl_engine.vision import is_vision_model

    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    path = resolve_model_path(path)
    auto = AutoModelForImageTextToText if is_vision_model(path) else AutoModelForCausalLM
    return auto.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn_implementation)


def load_processor(path: str):
    """The processor of an image-text policy (the same the engine renders and expands prompts with), or
    None for a text-only one."""
    from medvl_engine.vision import is_vision_model, load_processor

    path = resolve_model_path(path)
    return load_processor(path) if is_vision_model(path) else None
