"""Images on the learner's side: the processor of an image-text model, and prompts expanded the way the
engine expands them.

A prompt travels with one placeholder token per image (`<|image_pad|>` for Qwen2.5-VL), as the chat
template renders it; the engine's processor expands each placeholder into one token per merged patch
of its image. The learner expands the same ids with the same image processor, so its prompt tokens
equal the engine's token for token, and gets the `pixel_values` and `image_grid_thw` the vision tower
needs:

    processor = load_processor(model_path)                 # tokenizer for text models
    ids, vision = expand_image_tokens(prompt_ids, images, processor)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from medvl_engine.errors import ConfigError


def is_vision_model(path: str) -> bool:
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(path), "vision_config", None) is not None


@functools.cache
def _image_only_processor_class():
    from transformers import ProcessorMixin, Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor for images only: the stock one insists on a video processor, which needs
        torchvision (its Linux wheels are CUDA builds that break a CPU torch)."""

        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # What Qwen2_5_VLProcessor.__init__ sets before its (video-requiring) base call.
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2_5_VLProcessor


def image_only_processor(image_processor, tokenizer, chat_template: str | None = None):
    """A Qwen2.5-VL processor without a video processor (see `_image_only_processor_class`)."""
    return _image_only_processor_class()(image_processor=image_processor, tokenizer=tokenizer,
                                         chat_template=chat_template or tokenizer.chat_template)


def load_processor(path: str):
    """The tokenizer (text model) or the processor (image-text model) of a Hugging Face folder.

    Qwen2-VL-family folders load without torchvision too: when transformers cannot build the stock
    processor (it returns a bare tokenizer or fails on the video processor), the image processor and the
    tokenizer are loaded apart and joined in an image-only processor.
    """
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "vision_config", None) is None:
        return AutoTokenizer.from_pretrained(path)
    try:
        processor = AutoProcessor.from_pretrained(path)
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, ValueError, TypeError, OSError, AttributeError):
        pass
    if config.model_type not in ("qwen2_5_vl", "qwen2_vl"):
        raise ConfigError(f"{path}: no processor with an image processor could be loaded for {config.model_type}")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = AutoTokenizer.from_pretrained(path)
    return image_only_processor(Qwen2VLImageProcessorPil.from_pretrained(path), tokenizer)


def image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        raise ValueError(f"{type(processor).__name__} names no image token: an image-text model's processor is needed")
    return int(token_id)


def expand_image_tokens(prompt_ids: Sequence[int], images: Sequence, processor) -> tuple[list[int], dict]:
    """`prompt_ids` with each image placeholder expanded to its image's tokens, and the vision inputs.

    Returns (ids, {"pixel_values": [patches, D], "image_grid_thw": [images, 3]}); ({}, ids unchanged)
    without images. The count of placeholders must equal the count of images.
    """
    ids = [int(t) for t in prompt_ids]
    if not images:
        return ids, {}
    if not hasattr(processor, "image_processor"):
        raise ConfigError(f"{len(images)} image(s) but {type(processor).__name__} has no image processor: the policy "
                          "is a text-only model (use --data.text-only or --data.ignore-images for it)")
    pad = image_token_id(processor)
    slots = [i for i, t in enumerate(ids) if t == pad]
    if len(slots) != len(images):
        raise ValueError(f"the prompt has {len(slots)} image placeholder(s) for {len(images)} image(s)")
    encoded = processor.image_processor(images=list(images), return_tensors="pt")
    grid = encoded["image_grid_thw"]
    merge = int(getattr(processor.image_processor, "merge_size", 1))
    counts = (grid.prod(-1) // (merge * merge)).tolist()
    out: list[int] = []
    last = 0
    for slot, count in zip(slots, counts):
        out.extend(ids[last:slot])
        out.extend([pad] * int(count))
        last = slot + 1
    out.extend(ids[last:])
    return out, {"pixel_values": encoded["pixel_values"], "image_grid_thw": grid}


def batch_vision(parts: Sequence[dict], input_ids: torch.Tensor, image_token: int | None) -> dict[str, torch.Tensor]:
    """The vision inputs of a padded batch: every row's images in row order (rows without images contribute
    nothing) and `mm_token_type_ids` (1 on image tokens), without which Qwen2.5-VL cannot build its 3D
    (M-RoPE) positions and silently falls back to 1D ones: the learner's log-probs then drift from the
    engine's (measured ~1e-3 on a tiny fp32 model instead of ~1e-6)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    vision = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    vision["mm_token_type_ids"] = (input_ids == image_token).long()
    return vision
