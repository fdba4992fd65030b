"""Tiny models for the learner's tests, built offline in seconds.

- `tiny_chat_model`: a 2-layer Llama with a 512-token byte-level BPE trained on the bundled questions
  and a ChatML chat template (SmolLM2's turn markup), so prompts and SFT targets are a few hundred
  tokens, not a few thousand characters.
- `toy_model`: a word-level vocabulary of 12 tokens for the toy task of the learning test.

DeepSpeed compiles its CPU comm op on the first `deepspeed.initialize` (~35 s) into
`TORCH_EXTENSIONS_DIR`; it is pointed at the user cache so that happens once per machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                      str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "medvl-engine"
                          / "torch_extensions"))

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _save_tiny_llama(folder: Path, tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def bundled_text_samples() -> list:
    from medvl_engine.data import load_bundled

    return [s for s in load_bundled() if not s.images]


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from medvl_engine.data import load_bundled
    from medvl_engine.prompts import prompt_text, sft_target

    corpus = []
    for s in load_bundled():
        corpus += [prompt_text(s), sft_target(s), "user assistant"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIALS,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML_TEMPLATE)
    return _save_tiny_llama(tmp_path_factory.mktemp("tiny-chat"), tokenizer)


TOY_WORDS = ["A", "B", "C", "D", "q0", "q1", "q2", "q3", "answer"]


@pytest.fixture(scope="session")
def toy_model(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + TOY_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        chat_template=CHATML_TEMPLATE)
    return _save_tiny_llama(tmp_path_factory.mktemp("toy"), tokenizer, hidden=32, layers=1, seed=1)


@pytest.fixture(scope="session")
def tiny_vl_model(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL (the real Qwen2.5 tokenizer) saved with its image-only processor (4-16
    image tokens per image), as `medvl_engine.vision.load_processor` and the hf backend load it."""
    from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer, tiny_qwen2_5_vl

    folder = tmp_path_factory.mktemp("tiny-vl")
    tokenizer = qwen_tokenizer()
    tiny_qwen2_5_vl(tokenizer).save_pretrained(folder)
    image_only_qwen2_5_vl_processor(tokenizer).save_pretrained(folder)
    return folder
