"""SFT: the label mask on a real chat-templated example, and training that lowers the loss."""

from __future__ import annotations

import pytest
import torch
from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer

from medvl_engine.data import load_bundled
from medvl_engine.prompts import build_messages, sft_target
from medvl_engine.trainers.learner import pad_sequences
from medvl_engine.trainers.sft import encode_example, end_of_turn


def test_only_the_answer_carries_loss_on_a_qwen_chat_template():
    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    sample = load_bundled()[0]  # one image, MedVLThinker prompt, a reasoning trace
    example = encode_example(tokenizer, sample, max_tokens=4096, processor=processor)
    micro = pad_sequences([example.ids, example.ids[:-3]], [example.loss_start, example.loss_start],
                          tokenizer.pad_token_id)

    # The whole example is the chat template of the conversation with the answer, its image placeholder
    # expanded by the processor exactly as the engine expands it.
    messages = build_messages(sample) + [{"role": "assistant", "content": sft_target(sample)}]
    full = tokenizer.apply_chat_template(messages, tokenize=False).rstrip("\n")
    engine = processor(text=[full], images=list(sample.images), return_tensors="pt")
    assert example.ids == engine["input_ids"][0].tolist()
    assert torch.equal(example.vision["pixel_values"], engine["pixel_values"])
    # Loss falls on the assistant's answer and its end-of-turn token, nothing else.
    target_ids = micro.targets[0][micro.mask[0]].tolist()
    assert tokenizer.decode(target_ids) == sft_target(sample) + "<|im_end|>"
    assert end_of_turn(tokenizer) == "<|im_end|>"
    prompt_ids = micro.input_ids[0][: example.loss_start].tolist()
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert prompt_ids.count(processor.image_token_id) == int(example.vision["image_grid_thw"].prod() // 4) > 1
    # The mask is shifted: position t predicts token t + 1; padding never carries loss.
    assert micro.mask[0].sum() == len(example.ids) - example.loss_start
    assert micro.mask[1].sum() == len(example.ids) - 3 - example.loss_start
    assert not micro.mask[1, len(example.ids) - 4 :].any()


def test_an_image_row_for_a_text_only_policy_is_an_error_naming_the_way_out():
    with pytest.raises(ValueError, match="text-only model.*--data.text-only or --data.ignore-images"):
        encode_example(qwen_tokenizer(), load_bundled()[0], max_tokens=4096)


def test_an_example_longer_than_the_limit_is_an_error_not_a_truncation():
    tokenizer = qwen_tokenizer()
    with pytest.raises(ValueError, match="max_tokens 16"):
        encode_example(tokenizer, load_bundled()[0], max_tokens=16,
                       processor=image_only_qwen2_5_vl_processor(tokenizer))


@pytest.mark.slow
def test_sft_lowers_the_loss_on_the_bundled_data(tiny_chat_model, tmp_path):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers import sft
    from medvl_engine.trainers.config import SFTConfig

    cfg = config_lib.build(SFTConfig, {
        "model": {"path": str(tiny_chat_model), "dtype": "fp32", "gradient_checkpointing": False},
        "optim": {"lr": 3e-2},
        "data": {"text_only": True},
        "deepspeed": {"micro_batch_size": 1},
        "output": str(tmp_path / "run"),
        "checkpoint": {"export": True},
        "epochs": 5, "global_batch_size": 2,
    })
    history = sft.run(cfg)
    losses = [row["loss"] for row in history]
    assert len(losses) == 15  # 6 text-only questions / 2 per step x 5 epochs
    # The last three steps average well below the first three (measured: 6.25 -> 4.76 nats per token).
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "export")
    assert exported.config.vocab_size == len(AutoTokenizer.from_pretrained(tmp_path / "run" / "export"))


def test_checkpoint_final_off_leaves_only_the_export(tiny_chat_model, tmp_path):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers import sft
    from medvl_engine.trainers.config import SFTConfig

    cfg = config_lib.build(SFTConfig, {
        "model": {"path": str(tiny_chat_model), "dtype": "fp32", "gradient_checkpointing": False},
        "data": {"text_only": True, "max_samples": 2},
        "deepspeed": {"micro_batch_size": 1},
        "output": str(tmp_path / "run"),
        "checkpoint": {"final": False},
        "epochs": 1, "global_batch_size": 2,
    })
    assert len(sft.run(cfg)) == 1
    assert (tmp_path / "run" / "export" / "config.json").is_file()
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
