"""Weight push and export: bucketed gathering (ZeRO-1 and ZeRO-3), memory and disk sync into a real hf
backend with the new version, and a Hugging Face export that transformers loads back with equal logits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from medvl_engine.trainers.config import DeepSpeedConfig, ModelConfig, OptimConfig
from medvl_engine.transport.messages import WeightVersion


def build_learner(model_dir, zero_stage: int):
    from medvl_engine.trainers.learner import Learner

    return Learner.build(ModelConfig(path=str(model_dir), dtype="fp32", gradient_checkpointing=False),
                         OptimConfig(lr=1e-3), DeepSpeedConfig(zero_stage=zero_stage),
                         train_batch_size=1, total_steps=1)


def other_backend(model_dir):
    """An hf backend whose weights differ from the learner's (re-initialised), so a push is visible."""
    from medvl_engine.rollout.hf_backend import HFBackend

    backend = HFBackend.from_pretrained(str(model_dir), dtype="float32")
    with torch.no_grad():
        for p in backend.model.parameters():
            p.add_(1.0)
    return backend


def assert_same_weights(backend, state):
    model_state = backend.model.state_dict()
    for name, tensor in state.items():
        assert torch.equal(model_state[name], tensor), name


@pytest.mark.parametrize("zero_stage", [1, 3])
def test_buckets_hold_every_parameter_once_and_respect_the_size(toy_model, zero_stage):
    learner = build_learner(toy_model, zero_stage)
    full = learner.state_dict()
    bucket_bytes = 4096
    buckets = list(learner.full_parameters(bucket_bytes))
    assert len(buckets) > 1
    names = [n for b in buckets for n, _ in b]
    assert sorted(names) == sorted(n for n, _ in learner.module.named_parameters())
    for bucket in buckets:
        sizes = [t.numel() * t.element_size() for _, t in bucket]
        assert len(bucket) == 1 or sum(sizes) <= bucket_bytes  # one tensor may exceed a bucket alone
        for name, tensor in bucket:
            assert torch.equal(tensor.cpu(), full[name])
    # Under ZeRO-3 the module's own parameters stay partitioned, the buckets are whole tensors.
    embed = full["model.embed_tokens.weight"]
    assert embed.shape == (12, 32)


def test_memory_sync_updates_an_hf_backend_with_the_new_version(toy_model):
    from medvl_engine.trainers.weight_sync import MemorySync

    learner = build_learner(toy_model, 1)
    backend = other_backend(toy_model)
    loop = asyncio.new_event_loop()
    sync = MemorySync([backend], bucket_bytes=2048, run=loop.run_until_complete)
    stats = sync.push(learner, 7)
    assert backend.weight_version == 7 and stats["sync_bytes"] > 0
    assert_same_weights(backend, learner.state_dict())
    loop.run_until_complete(backend.shutdown())
    loop.close()


def test_disk_sync_announces_a_folder_the_backend_loads(toy_model, tmp_path):
    from medvl_engine.trainers.weight_sync import DiskSync

    learner = build_learner(toy_model, 3)
    announced: list[WeightVersion] = []
    sync = DiskSync(tmp_path / "weights", announced.append, keep=2)
    for version in (1, 2, 3):
        sync.push(learner, version)
    assert [a.version for a in announced] == [1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "weights").iterdir()) == ["v000002", "v000003"]  # keep=2

    backend = other_backend(toy_model)
    loop = asyncio.new_event_loop()
    loop.run_until_complete(backend.update_weights_from_disk(announced[-1].path, announced[-1].version))
    assert backend.weight_version == 3
    assert_same_weights(backend, learner.state_dict())
    loop.run_until_complete(backend.shutdown())
    loop.close()


def test_export_loads_back_with_equal_logits(toy_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medvl_engine.trainers.checkpoint import export_hf

    learner = build_learner(toy_model, 1)
    folder = export_hf(learner, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor([tokenizer("q1 A B", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, learner.module(ids).logits)
    assert tokenizer.eos_token == "<|im_end|>"


def test_the_engines_group_forms_with_an_explicit_timeout():
    """torch >= 2.13 refuses a process group created without a timeout (TypeError); a one-rank gloo group
    forms and broadcasts."""
    import torch.distributed as dist

    from medvl_engine.trainers.distributed import free_port
    from medvl_engine.trainers.weight_sync import _init_custom_group

    group = _init_custom_group("gloo", f"tcp://127.0.0.1:{free_port()}", 1, 0, "medvl_weights_test")
    tensor = torch.arange(3.0)
    dist.broadcast(tensor, src=0, group=group)
    assert tensor.tolist() == [0.0, 1.0, 2.0]
