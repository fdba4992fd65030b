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


# Where image-text models keep their vision encoder and the projector into the language model's embeddings:
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL `model.visual` with its `merger`; LLaVA, Gemma 3, Idefics `vision_tower` /
# `vision_model` with `multi_modal_projector` beside it.
_TOWERS = ("visual", "vision_tower", "vision_model")
_MERGERS = ("merger", "multi_modal_projector")


def vision_parameters(model) -> tuple[dict[str, torch.nn.Parameter], dict[str, torch.nn.Parameter]]:
    """`(tower, merger)`: the vision encoder's parameters (patch embedding, blocks) and the merger's (the
    projector into the language model), by name; both empty for a text-only model."""
    tower, merger = {}, {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if not any(part in _TOWERS for part in parts) and "multi_modal_projector" not in parts:
            continue
        (merger if any(part in _MERGERS for part in parts) else tower)[name] = param
    return tower, merger


def freeze_vision(model, *, tower: bool, merger: bool) -> int:
    """Turn off the gradients of the vision tower and/or the merger (`model.freeze_vision`,
    `model.freeze_merger`): DeepSpeed then keeps no gradient, fp32 master copy or optimizer state for them
    under any ZeRO stage (the learner hands it only parameters that require grad), and they stay as loaded;
    the checkpoint, the export and the weight push still carry them. Returns the parameters frozen."""
    if not (tower or merger):
        return 0
    tower_params, merger_params = vision_parameters(model)
    if not tower_params and not merger_params:
        raise ConfigError("model.freeze_vision / model.freeze_merger: this model has no vision tower "
                          f"({type(model).__name__})")
    frozen = 0
    for chosen, params in ((tower, tower_params), (merger, merger_params)):
        if chosen:
            for param in params.values():
                param.requires_grad_(False)
                frozen += param.numel()
    return frozen
