"""SFT: the label mask on a real chat-templated example, and training that lowers the loss."""

from __future__ import annotations

import io
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import image_only_qwen2_5_vl_processor, qwen_tokenizer

from medvl_engine import config as config_lib
from medvl_engine.data import load_bundled
from medvl_engine.errors import DataError
from medvl_engine.prompts import build_messages, sft_target
from medvl_engine.rollout.stream import epoch_order
from medvl_engine.trainers import sft
from medvl_engine.trainers.config import SFTConfig
from medvl_engine.trainers.learner import pad_sequences
from medvl_engine.trainers.sft import check_example, encode_example, end_of_turn


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
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    for check in (encode_example, check_example):  # the check counts the image tokens from the image's size
        with pytest.raises(ValueError, match=r"pmc_vqa\[0\]: \d+ tokens > max_tokens 16"):
            check(tokenizer, load_bundled()[0], max_tokens=16, processor=processor)


def test_a_row_is_checked_from_its_text_and_image_sizes_and_decoded_at_its_turn():
    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    sample = load_bundled()[0]
    row = check_example(tokenizer, sample, max_tokens=4096, processor=processor)
    example = encode_example(tokenizer, sample, max_tokens=4096, processor=processor)
    assert (row.tokens, row.target_tokens) == (len(example.ids), len(example.ids) - example.loss_start)

    # A placeholder in the row's text: named, with its field, before anything is decoded or trained.
    for field, bad in [("question", replace(sample, question=sample.question + " <|image_pad|>")),
                       ("reasoning", replace(sample, reasoning="see <|image_pad|> here"))]:
        with pytest.raises(DataError, match=rf"pmc_vqa\[0\]: the prompt has 2 image placeholder.*field '{field}'"):
            check_example(tokenizer, bad, max_tokens=4096, processor=processor)

    # A truncated JPEG has a whole header (its size): only decoding, at the row's turn, finds it.
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, "JPEG")
    truncated = replace(sample, images=[Image.open(io.BytesIO(encoded.getvalue()[:2000]))])
    check_example(tokenizer, truncated, max_tokens=4096, processor=processor)
    with pytest.raises(DataError, match=r"pmc_vqa\[0\]: field 'images': not a decodable image \(image file is trunc"):
        encode_example(tokenizer, truncated, max_tokens=4096, processor=processor)


class RankOf:
    """What `SFTTrainer` reads of a learner to pick and encode rows (no model): rank `rank` of `world_size`."""

    def __init__(self, rank: int, world_size: int, tokenizer, processor):
        self.rank, self.world_size, self.tokenizer, self.processor = rank, world_size, tokenizer, processor


def test_each_rank_encodes_only_its_share_of_each_step_in_the_stream_order_a_step_ahead(monkeypatch):
    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    cfg = config_lib.build(SFTConfig, {"data": {"max_samples": 10, "seed": 3}, "epochs": 3, "global_batch_size": 4})
    rows = sft.load_rows(cfg, tokenizer, processor)
    encoded = []  # (thread, dataset_index) of each row encoded
    encode = sft.encode_example

    def recorded(tokenizer, sample, **kwargs):
        encoded.append((threading.current_thread().name, sample.dataset_index))
        return encode(tokenizer, sample, **kwargs)

    monkeypatch.setattr(sft, "encode_example", recorded)
    ranks = [sft.SFTTrainer(cfg, RankOf(rank, 2, tokenizer, processor), rows) for rank in (0, 1)]
    assert ranks[0].total_steps == 6  # 10 rows, 2 steps an epoch (the last 2 rows of each epoch's order unused)
    for step in range(6):
        # The order of the one definition (the prompt stream's): a function of (seed, epoch) only.
        order = epoch_order(10, 3, step // 2)[(step % 2) * 4 : (step % 2) * 4 + 4]
        want = [rows[i].sample.dataset_index for i in order]
        got = [trainer.encoded.get(step) for trainer in ranks]
        assert [[e.dataset_index for e in examples] for examples in got] == [want[:2], want[2:]]
        assert got[0][1].ids == encode(tokenizer, rows[order[1]].sample, max_tokens=4096, processor=processor).ids
        # Nothing beyond the next step was encoded: this step's 4 rows and at most the next step's 4.
        assert len(encoded) <= 4 * (step + 1) + (4 if step < 5 else 0)
    for trainer in ranks:
        trainer.close()
    assert len(encoded) == 24 and {thread for thread, _ in encoded} == {"sft-encode_0"}

    # A resumed run encodes from its step on, the same rows as the run that got there.
    resumed = sft.SFTTrainer(cfg, RankOf(1, 2, tokenizer, processor), rows)
    assert [e.ids for e in resumed.encoded.get(3)] == [e.ids for e in got_at(cfg, rows, tokenizer, processor, 3)]
    assert [e.dataset_index for e in resumed.encoded.get(1)] == [e.dataset_index for e in
                                                                  got_at(cfg, rows, tokenizer, processor, 1)]
    resumed.close()


def got_at(cfg, rows, tokenizer, processor, step: int) -> list:
    """Rank 1's examples of `step` as every row encoded up front would give them (the code before SFT encoded a
    step at a time): the whole list, then the step's slice of its epoch order."""
    examples = [encode_example(tokenizer, row.sample, max_tokens=cfg.max_tokens, processor=processor) for row in rows]
    order = epoch_order(len(rows), cfg.data.seed, step // 2)
    start = (step % 2) * cfg.global_batch_size
    return [examples[i] for i in order[start : start + cfg.global_batch_size]][2:]


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
