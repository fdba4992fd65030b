"""The learner on CUDA: what `scripts/gpu-check` runs in its `grpo` step (`-m gpu`, DS_ACCELERATOR=cuda).

- the fused head (Triton `linear_token_logprobs`) against the logits path at Qwen2.5's vocabulary in
  bf16, forward and backward, each against an fp32 oracle;
- one colocated GRPO step of a tiny Qwen2.5-VL on image questions, hf backend on the GPU, with the
  engine/learner log-prob difference under a stated bound;
- memory weight sync into an hf backend on the GPU, and the export reloading with equal logits;
- the hand-off: the backend's release_memory frees its weights on the GPU, resume_memory brings them back.

Each records its timings (`record_property`, read into gpu-check's JSON). Skipped without CUDA.
`MEDVL_GPU_TESTS_ON_CPU=1` runs them on the CPU instead (`scripts/gpu-check --rehearse` does, to prove
their code before a GPU exists; the memory assertions then have nothing to measure and are skipped).
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from test_vision import vl_config
from test_weight_sync import assert_same_weights, build_learner, other_backend

ON_CPU = os.environ.get("MEDVL_GPU_TESTS_ON_CPU") == "1"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs CUDA")]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QWEN_VOCAB = 151_936


@pytest.fixture(autouse=True)
def _versions(record_property):
    """Which versions each test ran with (the GPU machine's differ from the CPU environment's lock)."""
    import importlib.metadata

    for name in ("torch", "triton", "transformers", "deepspeed"):
        try:
            record_property(f"{name}_version", importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            record_property(f"{name}_version", "absent")
    record_property("device", torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def test_fused_head_at_qwen_vocabulary_bf16_forward_and_backward(record_property):
    from test_fused_logprobs import llama_micro, plain_learner, run, tiny_llama

    from medvl_engine.trainers.fused_head import install_fused_head

    def paths(dtype):
        model = tiny_llama(QWEN_VOCAB, tied=False, hidden=128).to(DEVICE, dtype)
        install_fused_head(model)
        micro = llama_micro(QWEN_VOCAB).to(DEVICE)
        out = {}
        for fused in (True, False):
            _sync()
            start = time.perf_counter()
            out[fused] = run(plain_learner(model, fused=fused), micro, temperature=0.9, entropy=True)
            _sync()
            record_property(f"{dtype}_{'fused' if fused else 'logits'}_s", round(time.perf_counter() - start, 4))
        return out, micro

    bf16, micro = paths(torch.bfloat16)
    oracle, _ = paths(torch.float32)
    (o_logp, o_ent, o_grads) = oracle[False]
    errors = {}
    for fused in (True, False):
        logp, ent, grads = bf16[fused]
        errors[fused] = {
            "logp": (logp - o_logp)[micro.mask].abs().max().item(),
            "entropy": (ent - o_ent)[micro.mask].abs().max().item(),
            "grad": max(((grads[n].float() - o_grads[n]).abs().max() / o_grads[n].abs().max().clamp_min(1e-12)).item()
                        for n in o_grads),
        }
    record_property("errors_fused", errors[True])
    record_property("errors_logits", errors[False])
    # The fused head keeps its sums in fp32: at least as close to the fp32 model as the bf16 logits path,
    # with 10% for the order of bf16 roundings upstream of the head, which both paths share.
    for key in ("logp", "entropy", "grad"):
        assert errors[True][key] <= 1.1 * errors[False][key] + 1e-3, (key, errors)


@pytest.mark.slow
def test_one_colocated_grpo_step_on_images(tiny_vl_model, tmp_path, record_property):
    from medvl_engine.trainers import grpo

    cfg = vl_config(tiny_vl_model, tmp_path / "run", steps=1)
    start = time.perf_counter()
    rows = grpo.run(cfg)
    record_property("step_s", round(time.perf_counter() - start, 2))
    record_property("logp_diff_max", rows[0]["logp_diff_max"])
    assert rows[0]["images"] == 2 and rows[0]["groups"] == 2
    # fp32 engine and learner on one GPU: the same weights through different batch shapes and kernels
    # (cuBLAS picks per shape); 1e-6 on the CPU. A different image, template or position scheme moves it
    # by > 1e-2 (test_vision.py).
    assert rows[0]["logp_diff_max"] < 2e-3, rows


def test_memory_sync_into_the_backend_and_the_export_reload(toy_model, tmp_path, record_property):
    from transformers import AutoModelForCausalLM

    from medvl_engine.trainers.checkpoint import export_hf
    from medvl_engine.trainers.weight_sync import MemorySync

    learner = build_learner(toy_model, 1)
    backend = other_backend(toy_model)
    assert backend.device.type == DEVICE.type
    loop = asyncio.new_event_loop()
    try:
        sync = MemorySync([backend], bucket_bytes=2048, run=loop.run_until_complete)
        start = time.perf_counter()
        stats = sync.push(learner, 5)
        record_property("sync_s", round(time.perf_counter() - start, 4))
        assert backend.weight_version == 5 and stats["sync_bytes"] > 0
        assert_same_weights(backend, {k: v.to(backend.device) for k, v in learner.state_dict().items()})
    finally:
        loop.run_until_complete(backend.shutdown())
        loop.close()
    folder = export_hf(learner, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(folder).to(DEVICE)
    ids = torch.tensor([[3, 4, 5, 6]], device=DEVICE)
    module = learner.module
    with torch.no_grad():
        assert torch.equal(model(ids).logits, module(ids.to(next(module.parameters()).device)).logits.to(DEVICE))


def test_release_and_resume_memory_hand_the_gpu_back(toy_model, record_property):
    backend = other_backend(toy_model)
    loop = asyncio.new_event_loop()
    try:
        before = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
        loop.run_until_complete(backend.release_memory())
        released = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
        loop.run_until_complete(backend.resume_memory())
        resumed = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
        record_property("allocated_bytes", {"before": before, "released": released, "resumed": resumed})
        assert next(backend.model.parameters()).device.type == DEVICE.type
        if DEVICE.type != "cuda":
            pytest.skip("nothing to measure off CUDA (the code path ran)")
        weights = sum(p.numel() * p.element_size() for p in backend.model.parameters())
        assert before - released >= weights and resumed - released >= weights
    finally:
        loop.run_until_complete(backend.shutdown())
        loop.close()
