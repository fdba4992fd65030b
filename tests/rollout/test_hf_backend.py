"""HFBackend end to end with tiny random models: a text LlamaForCausalLM and a Qwen2.5-VL with images.

Log-probs are checked against an independent forward pass over prompt + answer:
log_softmax(logits / temperature) at the answer's tokens (the definition in hf_backend's docstring).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import byte_tokenizer, image_only_qwen2_5_vl_processor, qwen_tokenizer, tiny_llama, tiny_qwen2_5_vl

from medvl_engine.rollout.backend import make_backend
from medvl_engine.rollout.hf_backend import HFBackend
from medvl_engine.rollout.hf_sampler import RequestSampler
from medvl_engine.rollout.types import PromptRequest, SamplingParams


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


@pytest.fixture(scope="module")
def text_setup():
    tokenizer = byte_tokenizer()
    return tokenizer, tiny_llama(tokenizer)


def chat_ids(tokenizer, content: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"]


def forward_logprobs(model, prompt_ids, answer_ids, temperature: float, **extra) -> np.ndarray:
    ids = torch.tensor([list(prompt_ids) + [int(t) for t in answer_ids]])
    with torch.no_grad():
        logits = model(input_ids=ids, **extra).logits[0, len(prompt_ids) - 1 : -1].float()
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(1, torch.as_tensor(answer_ids, dtype=torch.long)[:, None])[:, 0].numpy()


def greedy_answer(backend, request, max_new_tokens=8):
    return run(backend.generate(request, SamplingParams(n=1, temperature=0.0, max_new_tokens=max_new_tokens)))[0]


def test_seeded_sampling_is_reproducible_and_logprobs_match_a_forward_pass(text_setup):
    tokenizer, model = text_setup
    backend = HFBackend(model, tokenizer, max_batch=16)
    short = PromptRequest("short", input_ids=chat_ids(tokenizer, "What is 2+2?"))
    long = PromptRequest("long", text="A much longer prompt, so the short one is left-padded in the batch.")
    params = SamplingParams(n=4, temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12, seed=11)

    async def scenario():
        first = await backend.generate(short, params)
        again = await backend.generate(short, params)
        unseeded = SamplingParams(n=3, temperature=0.7, top_p=0.9, top_k=40, max_new_tokens=12)
        batched = await asyncio.gather(backend.generate(short, unseeded), backend.generate(long, unseeded))
        await backend.shutdown()
        return first, again, batched

    first, again, (short_batch, long_batch) = run(scenario())
    assert len(first) == 4
    for a, b in zip(first, again):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.logprobs, b.logprobs)
    assert len({tuple(c.token_ids.tolist()) for c in first}) > 1  # n samples, not n copies
    assert len(short_batch) == 3 and len(long_batch) == 3
    long_ids = tokenizer(long.text, add_special_tokens=False).input_ids
    for prompt_ids, completions in ((short.input_ids, first), (short.input_ids, short_batch), (long_ids, long_batch)):
        for c in completions:
            assert c.finish_reason == "length" and c.num_tokens == 12 and c.weight_version == 0
            assert c.text == tokenizer.decode(c.token_ids, skip_special_tokens=True)
            # fp32 on CPU: the cached decode and one full forward agree to ~5e-7; 1e-4 leaves room for kernels.
            np.testing.assert_allclose(c.logprobs, forward_logprobs(model, prompt_ids, c.token_ids, 0.7), atol=1e-4)


def test_greedy_answers_are_identical_argmax_with_raw_logprobs(text_setup):
    tokenizer, model = text_setup
    backend = HFBackend(model, tokenizer)
    request = PromptRequest("g", input_ids=chat_ids(tokenizer, "Name a bone."))
    completions = run(backend.generate(request, SamplingParams(n=3, temperature=0.0, max_new_tokens=6)))
    assert len({tuple(c.token_ids.tolist()) for c in completions}) == 1
    answer = completions[0]
    ids = torch.tensor([request.input_ids + answer.token_ids.tolist()])
    with torch.no_grad():
        logits = model(ids).logits[0, len(request.input_ids) - 1 : -1]
    assert logits.argmax(-1).tolist() == answer.token_ids.tolist()
    np.testing.assert_allclose(answer.logprobs, forward_logprobs(model, request.input_ids, answer.token_ids, 1.0),
                               atol=1e-4)


def test_eos_and_stop_strings_end_answers(text_setup):
    tokenizer, model = text_setup
    request = PromptRequest("s", input_ids=chat_ids(tokenizer, "Say something."))
    reference = greedy_answer(HFBackend(model, tokenizer), request)
    assert reference.finish_reason == "length"

    # Make the greedy answer's third token an end-of-sequence token: the answer stops there, EOS kept.
    third = int(reference.token_ids[2])
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, third]
    try:
        with_eos = greedy_answer(HFBackend(model, tokenizer), request)
    finally:
        model.generation_config.eos_token_id = tokenizer.eos_token_id
    assert with_eos.finish_reason == "stop" and with_eos.token_ids.tolist() == reference.token_ids[:3].tolist()
    assert with_eos.logprobs.shape == (3,)

    # A stop string taken from the greedy answer's text after its first token: the answer ends on the
    # first token whose text completes the string, and the answer's text drops the string.
    tokens = reference.token_ids.tolist()
    full = tokenizer.decode(tokens)
    start = len(tokenizer.decode(tokens[:1]))
    stop = next(full[i : i + 2] for i in range(start, len(full) - 1) if full[i : i + 2].isprintable())
    end = next(t for t in range(1, len(tokens) + 1) if stop in tokenizer.decode(tokens[:t]))
    stopped = run(HFBackend(model, tokenizer).generate(
        request, SamplingParams(n=2, temperature=0.0, max_new_tokens=8, stop=(stop,))))
    for c in stopped:
        assert c.finish_reason == "stop"
        assert c.token_ids.tolist() == tokens[:end]
        assert c.text == full[: full.index(stop)]


def test_weight_updates_from_tensors_and_disk(text_setup, tmp_path):
    tokenizer, _ = text_setup
    model = tiny_llama(tokenizer, seed=1)
    other = tiny_llama(tokenizer, seed=2)
    backend = HFBackend(model, tokenizer)
    request = PromptRequest("w", input_ids=chat_ids(tokenizer, "Which organ filters blood?"))
    params = SamplingParams(n=1, temperature=0.0, max_new_tokens=8)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    other.save_pretrained(tmp_path / "other")

    async def scenario():
        before = (await backend.generate(request, params))[0]
        await backend.update_weights_from_tensors(other.state_dict().items(), version=3)
        from_tensors = (await backend.generate(request, params))[0]
        with pytest.raises(KeyError, match="no.such.weight"):
            await backend.update_weights_from_tensors([("no.such.weight", torch.zeros(1))], version=9)
        with pytest.raises(ValueError, match="shape"):
            name, tensor = next(iter(original.items()))
            await backend.update_weights_from_tensors([(name, torch.zeros(tensor.numel() + 1))], version=9)
        assert backend.weight_version == 3
        await backend.update_weights_from_tensors(original.items(), version=4)
        restored = (await backend.generate(request, params))[0]
        await backend.update_weights_from_disk(str(tmp_path / "other"), version=5)
        from_disk = (await backend.generate(request, params))[0]
        return before, from_tensors, restored, from_disk

    before, from_tensors, restored, from_disk = run(scenario())
    expected_other = greedy_answer(HFBackend(other, tokenizer), request)
    assert not np.array_equal(before.token_ids, expected_other.token_ids)
    assert np.array_equal(from_tensors.token_ids, expected_other.token_ids) and from_tensors.weight_version == 3
    assert np.array_equal(restored.token_ids, before.token_ids) and restored.weight_version == 4
    assert np.array_equal(from_disk.token_ids, expected_other.token_ids) and from_disk.weight_version == 5


def test_pause_holds_requests_until_resume(text_setup):
    tokenizer, model = text_setup
    backend = HFBackend(model, tokenizer)
    request = PromptRequest("p", input_ids=chat_ids(tokenizer, "Hold on."))

    async def scenario():
        await backend.pause()
        task = asyncio.create_task(backend.generate(request, SamplingParams(n=2, max_new_tokens=4, seed=0)))
        await asyncio.sleep(0.2)
        held = not task.done()
        await backend.resume()
        completions = await task
        healthy = await backend.health()
        await backend.shutdown()
        return held, completions, healthy, await backend.health()

    held, completions, healthy, after_shutdown = run(scenario())
    assert held and len(completions) == 2 and healthy and not after_shutdown


def test_images_need_a_processor(text_setup):
    tokenizer, model = text_setup
    request = PromptRequest("i", text="look", images=[Image.new("RGB", (32, 32))])
    with pytest.raises(ValueError, match="image"):
        run(HFBackend(model, tokenizer).generate(request, SamplingParams()))


def test_make_backend_loads_a_saved_folder(text_setup, tmp_path):
    tokenizer, model = text_setup
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backend = make_backend("hf", str(tmp_path), max_batch=4)
    request = PromptRequest("m", input_ids=chat_ids(tokenizer, "Loaded?"))
    assert np.array_equal(greedy_answer(backend, request).token_ids,
                          greedy_answer(HFBackend(model, tokenizer), request).token_ids)
    with pytest.raises(ValueError, match="unknown backend"):
        make_backend("nope", str(tmp_path))


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_qwen2_5_vl_with_images_samples_reproducibly_with_matching_logprobs():
    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    model = tiny_qwen2_5_vl(tokenizer)
    backend = HFBackend(model, processor, max_batch=8)
    prompts = []
    for i, size in enumerate([(90, 60), (40, 40)]):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Finding {i}?"}]}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(PromptRequest(f"vl{i}", text=text, images=[_image(i, size)]))
    seeded = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=5)
    unseeded = SamplingParams(n=2, temperature=1.0, max_new_tokens=6)

    async def scenario():
        first = await backend.generate(prompts[0], seeded)
        again = await backend.generate(prompts[0], seeded)
        batched = await asyncio.gather(*(backend.generate(p, unseeded) for p in prompts))
        return first, again, batched

    first, again, batched = run(scenario())
    for a, b in zip(first, again):
        assert np.array_equal(a.token_ids, b.token_ids) and np.array_equal(a.logprobs, b.logprobs)
    for request, completions in zip([prompts[0], *prompts], [first, *batched]):
        inputs = processor(text=[request.text], images=[request.images], return_tensors="pt")
        prompt_ids = inputs["input_ids"][0].tolist()
        assert prompt_ids.count(model.config.image_token_id) > 1  # the processor expanded the placeholder
        for c in completions:
            assert c.num_tokens >= 1
            expected = forward_logprobs(model, prompt_ids, c.token_ids, 1.0, pixel_values=inputs["pixel_values"],
                                        image_grid_thw=inputs["image_grid_thw"],
                                        mm_token_type_ids=_mm_types(inputs, c.token_ids))
            np.testing.assert_allclose(c.logprobs, expected, atol=1e-4)


def _mm_types(inputs, answer_ids) -> torch.Tensor | None:
    """The processor's image-token mask extended over the answer (answers are text)."""
    types = inputs.get("mm_token_type_ids")
    if types is None:
        return None
    return torch.cat([types, torch.zeros((1, len(answer_ids)), dtype=types.dtype)], dim=1)


def test_a_seeded_request_draws_the_same_answers_alone_or_batched_with_others(text_setup):
    tokenizer, model = text_setup
    backend = HFBackend(model, tokenizer, max_batch=16)
    shared = SamplingParams(n=3, temperature=1.0, max_new_tokens=10, seed=99)
    target = PromptRequest("t", input_ids=chat_ids(tokenizer, "Which nerve?"), seed=2024)
    others = [PromptRequest(f"o{i}", input_ids=chat_ids(tokenizer, "Another, longer question " * (i + 1)), seed=i)
              for i in range(3)]

    async def scenario():
        alone = await backend.generate(target, shared)
        batched = await asyncio.gather(*(backend.generate(r, shared) for r in [*others, target]))
        other_seed = await backend.generate(PromptRequest("t", input_ids=target.input_ids, seed=7), shared)
        params_seed = await backend.generate(PromptRequest("t", input_ids=target.input_ids), shared)
        await backend.shutdown()
        return alone, batched, other_seed, params_seed

    alone, batched, other_seed, params_seed = run(scenario())
    assert backend.max_batch >= 4 * shared.n  # the four requests shared one generate call
    for a, b in zip(alone, batched[-1]):
        assert np.array_equal(a.token_ids, b.token_ids)
        # Same draws; the logits of a wider, padded batch round differently in the last bits.
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    answers = {tuple(c.token_ids.tolist()) for c in alone}
    assert answers.isdisjoint({tuple(c.token_ids.tolist()) for c in other_seed})
    assert answers.isdisjoint({tuple(c.token_ids.tolist()) for c in params_seed})


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, -1, 1.0), (0.5, 3, 1.0), (2.0, -1, 0.6)])
def test_request_sampler_draws_from_the_warped_distribution(temperature, top_k, top_p):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.5, 0.5, 0.0, -1.0, -3.0]])
    expected = logits / temperature
    if top_k != -1:
        expected = TopKLogitsWarper(top_k)(None, expected)
    if top_p < 1.0:
        expected = TopPLogitsWarper(top_p)(None, expected)
    expected = torch.softmax(expected, dim=-1)[0].numpy()
    rows = 20_000
    sampler = RequestSampler([rows // 2, rows // 2], [torch.Generator().manual_seed(s) for s in (1, 2)],
                             temperature=temperature, top_k=top_k, top_p=top_p)
    forced = sampler(None, logits.expand(rows, -1).clone())
    chosen = forced.argmax(-1)
    assert torch.all(forced.isinf().sum(-1) == logits.shape[1] - 1)  # one finite entry per row: the choice
    freq = np.bincount(chosen.numpy(), minlength=logits.shape[1]) / rows
    assert np.all(freq[expected == 0] == 0)  # nothing outside top-k / top-p
    # Binomial std of a frequency over 20k draws is <= 0.0036: 5 sigma is 0.018.
    np.testing.assert_allclose(freq, expected, atol=0.018)
    logp = torch.log_softmax(logits / temperature, -1)[0]
    np.testing.assert_allclose(sampler.logprobs()[:, 0].numpy(), logp[chosen].numpy(), rtol=1e-6)


def test_request_sampler_draws_exactly_across_blocks_of_a_large_vocabulary():
    """The inverse-CDF draw picks a block of 256 ids and then an id inside it: ids on both sides of block
    edges and in the last, partial block come out at their probabilities; ids of weight 0 never do,
    not even next to a chosen one or when the target lands on a block's end."""
    from medvl_engine.rollout.hf_sampler import inverse_cdf

    vocab = 3 * 256 + 40
    live = {0: 1.0, 255: 0.5, 256: 2.0, 511: -1.0, 700: 0.0, vocab - 1: 1.5}
    logits = torch.full((1, vocab), float("-inf"))
    for index, value in live.items():
        logits[0, index] = value
    rows = 24_000
    sampler = RequestSampler([rows // 3] * 3, [torch.Generator().manual_seed(s) for s in (3, 4, 5)],
                             temperature=1.0)
    chosen = sampler(None, logits.expand(rows, -1).clone()).argmax(-1)
    expected = torch.softmax(logits, dim=-1)[0].numpy()
    freq = np.bincount(chosen.numpy(), minlength=vocab) / rows
    assert set(np.flatnonzero(freq)) <= set(live)
    # Binomial std of a frequency over 24k draws is <= 0.0033: 5 sigma is 0.017.
    np.testing.assert_allclose(freq, expected, atol=0.017)
    np.testing.assert_allclose(sampler.logprobs()[:, 0].numpy(), torch.log_softmax(logits, -1)[0, chosen].numpy(),
                               rtol=1e-6)
    # Uniform draws at 0 and just below 1 land on the first and the last live id (the targets' edges).
    weights = torch.exp(logits - logits.max()).expand(2, -1).contiguous()
    edges = torch.tensor([[0.0], [np.nextafter(1.0, 0.0)]], dtype=torch.float64)
    picked, total = inverse_cdf(weights, edges)
    assert picked.tolist() == [0, vocab - 1]
    np.testing.assert_allclose(total.numpy(), weights[0].double().sum().item(), rtol=1e-6)  # float32 block sums


def test_a_prompts_images_are_processed_once_for_its_n_answers():
    """(Once the image processor ran n times per prompt: every answer's row carried its own copy, verl #5171.)
    The inputs equal processing every row, and the image processor sees each image once."""
    tokenizer = qwen_tokenizer()
    processor = image_only_qwen2_5_vl_processor(tokenizer)
    backend = HFBackend(tiny_qwen2_5_vl(tokenizer), processor, max_batch=16)
    requests = []
    for i, images in enumerate([[_image(1, (90, 60))], [], [_image(2, (40, 40)), _image(3, (56, 84))]]):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": f"Finding {i}?"}]
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                             tokenize=False)
        requests.append(PromptRequest(f"vl{i}", text=text, images=images))
    repeats = [3, 2, 4]
    rows = [r for r, n in zip(requests, repeats) for _ in range(n)]
    every_row = processor(text=[r.text for r in rows], images=[im for r in rows for im in r.images], padding=True,
                          padding_side="left", return_tensors="pt")

    seen = []
    preprocess = processor.image_processor.preprocess

    def counting(images, *args, **kwargs):
        def flat(x):
            return [im for y in x for im in flat(y)] if isinstance(x, (list, tuple)) else [x]

        seen.extend(flat(images))
        return preprocess(images, *args, **kwargs)

    processor.image_processor.preprocess = counting  # what the image processor's __call__ runs
    try:
        inputs = backend._encode(requests, repeats)
    finally:
        del processor.image_processor.preprocess
    assert len(seen) == 3  # each image once (the old way: 3 x 1 + 4 x 2 = 11)
    assert set(inputs) == set(every_row)
    for key, value in every_row.items():
        assert torch.equal(inputs[key], value), key
