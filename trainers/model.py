"""Loading the policy and its tokenizer (model names resolve through `medvl_engine.models`)."""

from __future__ import annotations

import torch

from medvl_engine.models import EMBEDDED_DEFAULT, cache_dir, resolve_model_path  # noqa: F401 (re-exported)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(path: str, dtype: str = "fp32", attn_implementation: str = "sdpa"):
    """The causal LM at `path` in `dtype` ("bf16", "fp16" or "fp32")."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model.dtype: {dtype!r} is not one of {sorted(DTYPES)}")
    return AutoModelForCausalLM.from_pretrained(resolve_model_path(path), dtype=DTYPES[dtype],
                                                attn_implementation=attn_implementation)
