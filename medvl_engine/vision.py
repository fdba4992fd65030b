"""Images as the model sees them: the processor of an image-text model, the one pixel rule engine and
learner share, and prompts expanded the way the engine expands them.

A prompt travels with one placeholder token per image (`<|image_pad|>` for Qwen2.5-VL), as the chat
template renders it; the engine's processor expands each placeholder into one token per merged patch
of its image. The learner expands the same ids with the same image processor, so its prompt tokens
equal the engine's token for token, and gets the `pixel_values` and `image_grid_thw` the vision tower
needs:

    processor = load_processor(model_path)                 # tokenizer for text models
    ids, vision = expand_image_tokens(prompt_ids, images, processor)
    length = expanded_length(prompt_ids, images, processor)  # the same length, from image sizes alone

Every image is decoded into a private copy in the processor's RGB (`decoded_copy`) before a processor sees
it, on both sides: the rollout pool does it once per request before the backend and the wire get the
image, the learner in `expand_image_tokens`. Alpha, and the transparency of a palette or grayscale image,
is then composited on white once, by one rule, whatever the wire format or the engine's processor version.
"""

from __future__ import annotations

import functools
import io
import threading
from collections.abc import Sequence

import torch
from PIL import Image

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


# Guards `load()` of a lazily decoded image that `decoded_copy` cannot reopen from bytes (one opened from a
# file by someone else); the loaders' images never take it.
_SHARED_LOAD = threading.Lock()


def model_rgb(image: Image.Image) -> Image.Image:
    """`image` as a new RGB image by the rule of transformers' image processors (`convert_to_rgb`, which
    Qwen2-VL's applies with `do_convert_rgb`): alpha or a transparency key (P, L, RGB) composited on white,
    any other mode (L, CMYK, I;16, P) through PIL's `convert("RGB")`. Delegated, not copied, so the rule is
    the installed processor's own; an RGB image then passes any processor unchanged."""
    from transformers.image_transforms import convert_to_rgb

    # The installed transformers' rule (5.25 composites alpha on white; 5.19, which vLLM's CPU build pins, uses
    # PIL's convert): a learner and an engine in different environments can still differ.
    converted = convert_to_rgb(image)
    return converted if converted is not image else image.convert("RGB")


def decoded_copy(image: Image.Image) -> Image.Image:
    """`image` decoded into pixels of its own, in the processor's RGB (`model_rgb`); `image` is left as it was.

    The loaders' images are decoded lazily from their encoded bytes and shared by every request of their
    sample, and a stream that cycles a small dataset has several positions of one sample in flight: PIL's
    `load()` on one image from two threads fails (AssertionError in PngImagePlugin.load_end, or "broken data
    stream"; 38 of 200 loads of a 64x64 PNG from 4 threads). So each call decodes with a decoder of its own,
    opened on the same bytes. A private copy rather than a lock on the shared image: a loaded shared image
    would keep its pixels in the dataset for the rest of the run (the ~6 GB of MedVLThinker-Eval the loaders
    avoid by keeping compressed bytes), and a lock would decode one image at a time."""
    if getattr(image, "tile", None):  # not decoded yet
        source = image.fp  # read once: a load elsewhere sets it to None
        if isinstance(source, io.BytesIO):  # the loaders' images: their encoded bytes, in memory
            image = Image.open(io.BytesIO(source.getvalue()))
        else:
            with _SHARED_LOAD:
                image.load()
    return model_rgb(image)


def image_token_id(processor) -> int:
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None:
        raise ValueError(f"{type(processor).__name__} names no image token: an image-text model's processor is needed")
    return int(token_id)


def placeholder_mismatch(prompt_ids: Sequence[int], num_images: int, processor) -> str | None:
    """Why the image placeholders of `prompt_ids` and `num_images` images do not pair up one to one, or None.

    Counted with or without images: a placeholder without its image fails the model's forward ("image
    features and image tokens do not match"). A text model's tokenizer names no image token: None."""
    pad = getattr(processor, "image_token_id", None)
    if pad is None:
        return None
    count = sum(1 for t in prompt_ids if t == pad)
    if count == num_images:
        return None
    return f"the prompt has {count} image placeholder(s) for {num_images} image(s)"


def _check_image_processor(images: Sequence, processor) -> None:
    if not hasattr(processor, "image_processor"):
        raise ConfigError(f"{len(images)} image(s) but {type(processor).__name__} has no image processor: the policy "
                          "is a text-only model (use --data.text-only or --data.ignore-images for it)")


def expanded_length(prompt_ids: Sequence[int], images: Sequence, processor) -> int:
    """`len(expand_image_tokens(prompt_ids, images, processor)[0])` from the images' sizes alone (nothing is
    decoded): each placeholder becomes the image processor's patch count over the merged patch
    (`get_number_of_image_patches`, the count vLLM relies on). The placeholders must pair up with the images."""
    if not images:
        return len(prompt_ids)
    _check_image_processor(images, processor)
    mismatch = placeholder_mismatch(prompt_ids, len(images), processor)
    if mismatch:
        raise ValueError(mismatch)
    image_processor = processor.image_processor
    merge = int(getattr(image_processor, "merge_size", 1))
    tokens = sum(image_processor.get_number_of_image_patches(image.height, image.width) // (merge * merge)
                 for image in images)
    return len(prompt_ids) - len(images) + tokens


def expand_image_tokens(prompt_ids: Sequence[int], images: Sequence, processor) -> tuple[list[int], dict]:
    """`prompt_ids` with each image placeholder expanded to its image's tokens, and the vision inputs.

    Returns (ids, {"pixel_values": [patches, D], "image_grid_thw": [images, 3]}); ({}, ids unchanged)
    without images. The count of placeholders must equal the count of images, also when there are none.
    Each image reaches the image processor as `decoded_copy(image)`, the pixels the engine was given.
    """
    ids = [int(t) for t in prompt_ids]
    if images:
        _check_image_processor(images, processor)
    mismatch = placeholder_mismatch(ids, len(images), processor)
    if mismatch:
        raise ValueError(mismatch)
    if not images:
        return ids, {}
    pad = image_token_id(processor)
    slots = [i for i, t in enumerate(ids) if t == pad]
    encoded = processor.image_processor(images=[decoded_copy(image) for image in images], return_tensors="pt")
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
