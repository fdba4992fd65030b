"""Packed micro-batches: the answers of a micro-batch end to end in one row, no padding, give the log-probs and
gradients of the padded path within fp32 tolerance (SDPA and eager on the CPU), on a tiny Llama and on a tiny
Qwen2.5-VL with 1-2 images a prompt (3-D M-RoPE positions per sequence).

(Once every micro-batch was padded to its longest answer: with answer lengths varying 8x, most of its
attention and MLP work went to pad tokens.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from medvl_engine.trainers.learner import Learner, MicroBatch, pack, pad_sequences, unpack


def learner_over(model, *, packing: bool) -> Learner:
    learner = Learner.__new__(Learner)
    learner.engine, learner.reference, learner.fused_logprobs, learner.packing = model, None, True, packing
    return learner


def logprobs_and_grads(model, micro: MicroBatch, packing: bool):
    model.zero_grad()
    logp = learner_over(model, packing=packing).response_logprobs(micro)
    (logp * torch.linspace(0.5, 1.5, logp.shape[-1])).sum().backward()
    return logp.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(model, micro):
    padded, padded_grads = logprobs_and_grads(model, micro, packing=False)
    packed, packed_grads = logprobs_and_grads(model, micro, packing=True)
    assert packed.shape == padded.shape and torch.equal(packed == 0, padded == 0)
    torch.testing.assert_close(packed, padded, atol=2e-5, rtol=1e-5)
    assert set(packed_grads) == set(padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=2e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_llama_micro_batch_equals_the_padded_one(attn):
    from tiny_models import byte_tokenizer, tiny_llama

    from medvl_engine.trainers.fused_head import install_fused_head

    model = tiny_llama(byte_tokenizer(), seed=3).float()
    model.config._attn_implementation = attn
    install_fused_head(model)
    gen = torch.Generator().manual_seed(0)
    lengths = [40, 5, 23, 9]  # answers varying 8x
    sequences = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in lengths]
    micro = pad_sequences(sequences, [3, 2, 6, 4], pad_id=0)
    assert_same(model, micro)


def test_a_packed_qwen2_5_vl_micro_batch_with_images_equals_the_padded_one(tiny_vl_model):
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from medvl_engine.trainers.fused_head import install_fused_head
    from medvl_engine.vision import batch_vision, expand_image_tokens, load_processor

    processor = load_processor(str(tiny_vl_model))
    model = AutoModelForImageTextToText.from_pretrained(tiny_vl_model, dtype=torch.float32)
    install_fused_head(model)
    pad = processor.image_token_id
    gen = torch.Generator().manual_seed(1)
    rows, vision, starts = [], [], []
    for images, answer in (([(56, 84)], 30), ([(40, 40), (90, 60)], 6), ([], 12), ([(28, 56)], 3)):
        pil = [Image.new("RGB", size, color=(len(rows) * 40, 90, 160)) for size in images]
        prompt = [9, 10] + [t for _ in pil for t in (pad, 13)] + [11, 12]  # a token between images, as in chat
        ids, v = expand_image_tokens(prompt, pil, processor) if pil else (prompt, {})
        starts.append(len(ids))
        rows.append(ids + torch.randint(100, 5000, (answer,), generator=gen).tolist())
        vision.append(v)
    micro = pad_sequences(rows, starts, pad_id=0)
    micro.vision = batch_vision(vision, micro.input_ids, pad)
    assert micro.vision["image_grid_thw"].shape[0] == 4
    assert_same(model, micro)


def test_pack_and_unpack_put_every_position_back():
    micro = pad_sequences([[1, 2, 3, 4], [5, 6], [7, 8, 9]], [2, 1, 2], pad_id=0)
    packed = pack(micro)
    assert packed.inputs["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert packed.inputs["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 0, 1, 2]]
    # A sequence's last position predicts nothing: its next token is the next sequence's.
    assert packed.targets.tolist() == [[2, 3, 4, 0, 6, 0, 8, 9]]
    assert packed.mask.tolist() == [[False, True, True, False, True, False, False, True]]
    values = torch.arange(1.0, 9.0)[None]
    assert unpack(values, packed, tuple(micro.targets.shape)).tolist() == [[1, 2, 3], [5, 0, 0], [7, 8, 0]]


def test_packing_is_on_with_a_varlen_kernel_and_when_asked():
    from medvl_engine.trainers.config import ModelConfig

    assert not ModelConfig(path="m").packing_on  # SDPA: a [tokens, tokens] mask, more memory than padding
    assert ModelConfig(path="m", attn_implementation="flash_attention_2").packing_on
    assert ModelConfig(path="m", packing="on").packing_on
    assert not SimpleNamespace(packing_on=False).packing_on


@pytest.mark.slow
def test_a_grpo_step_with_packing_on_matches_the_padded_step(tiny_chat_model, tmp_path):
    from medvl_engine import config as config_lib
    from medvl_engine.trainers import grpo
    from medvl_engine.trainers.config import GRPOConfig

    def step(packing: str) -> dict:
        cfg = config_lib.build(GRPOConfig, {
            "model": {"path": str(tiny_chat_model), "dtype": "fp32", "gradient_checkpointing": False,
                      "packing": packing},
            "optim": {"lr": 1e-2}, "data": {"source": "bundled", "text_only": True, "shuffle": False},
            "rollout": {"n": 4, "max_response_tokens": 16, "seed": 3, "max_staleness": 0},
            "algo": {"prompts_per_step": 2, "mini_batches": 1, "kl_coef": 0.01},
            "deepspeed": {"micro_batch_size": 4}, "output": str(tmp_path / packing),
            "checkpoint": {"every": 0, "final": False, "export": False}, "steps": 2, "seed": 1})
        return grpo.run(cfg)

    padded, packed = step("off"), step("on")
    for a, b in zip(padded, packed):
        for key in ("loss", "kl", "grad_norm", "logp_diff_mean", "response_len"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
