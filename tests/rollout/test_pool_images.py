"""The pool's images: each request decodes its own copy, also when several positions of one sample are in
flight at once, and the learner is sent the pixels the engine's processor is given.

A stream that cycles a small dataset has two positions of one sample in flight together, and both
requests hold the sample's one lazily decoded PIL image: decoding that object from two executor threads
crashed a colocated GRPO run in PIL (AssertionError in PngImagePlugin.load_end) in 2 of 3 runs.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import torch
from PIL import Image
from scripted_backend import ScriptedBackend

from medvl_engine.data import Sample, load_samples
from medvl_engine.rollout.groups import ScoredGroup, to_message
from medvl_engine.rollout.pool import RolloutPool
from medvl_engine.rollout.types import PromptRequest, SamplingParams
from medvl_engine.transport.messages import decode, encode
from medvl_engine.vision import expand_image_tokens, model_rgb


def _png(seed: int, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _dataset(tmp_path) -> str:
    """Two rows of PNG images: row 0 with one, row 1 with two (the failing run's 1-2 per question)."""
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
    rows = [{"dataset_name": "unit", "dataset_index": index, "question": f"What is shown in scan {index}?",
             "options": {"A": "yes", "B": "no"}, "answer_label": "A", "answer": "yes", "images": images}
            for index, images in ((0, ["img/0.png"]), (1, ["img/1.png", "img/2.png"]))]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


async def _collect(pool: RolloutPool) -> list:
    return [item async for item in pool.stream()]


def test_positions_of_one_sample_in_flight_together_decode_their_images_apart(tmp_path):
    path = _dataset(tmp_path)
    expected = {i: np.asarray(Image.open(tmp_path / "img" / f"{i}.png").convert("RGB")) for i in range(3)}
    positions = 12  # 6 positions of each row, all in flight at once on the pool's executor threads
    for _ in range(50):
        samples = load_samples(path)  # fresh, still undecoded images: the race is on each image's first load
        requests = [PromptRequest(f"p{k}", input_ids=[1], images=list(samples[k % 2].images), sample=samples[k % 2],
                                  position=k) for k in range(positions)]
        pool = RolloutPool([ScriptedBackend("a")], requests, SamplingParams(n=2), max_in_flight=positions)
        items = asyncio.run(_collect(pool))
        assert len(items) == positions and all(isinstance(item, ScoredGroup) for item in items), items
        for item in items:
            shared = samples[item.request.position % 2].images
            assert all(mine is not theirs for mine, theirs in zip(item.request.images, shared))
            files = [0] if item.request.position % 2 == 0 else [1, 2]
            assert len(item.request.images) == len(files)
            assert all(np.array_equal(np.asarray(image), expected[i]) for image, i in zip(item.request.images, files))
        # The dataset keeps its compressed bytes: no request decoded the shared images.
        assert all(image.tile for sample in samples for image in sample.images)


def _transparent_images() -> list[Image.Image]:
    """Images whose alpha or transparency key a bare convert("RGB") would drop, and a CMYK one."""
    rng = np.random.default_rng(7)
    rgba = Image.fromarray(rng.integers(0, 256, (24, 30, 4), dtype=np.uint8), "RGBA")
    la = Image.fromarray(rng.integers(0, 256, (30, 24, 2), dtype=np.uint8), "LA")
    palette = Image.fromarray(rng.integers(0, 16, (28, 28), dtype=np.uint8), "P")
    palette.putpalette(rng.integers(0, 256, 16 * 3, dtype=np.uint8).tolist())
    palette.info["transparency"] = 3
    cmyk = Image.fromarray(rng.integers(0, 256, (28, 32, 4), dtype=np.uint8), "CMYK")
    return [rgba, la, palette, cmyk]


class RecordingBackend(ScriptedBackend):
    """Keeps the images each request reached the backend with: what the engine's processor is given."""

    def __init__(self):
        super().__init__("engine")
        self.images: list = []

    async def generate(self, request, params):
        self.images.append(list(request.images))
        return await super().generate(request, params)


def test_the_learner_is_sent_the_pixels_the_engines_processor_sees():
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = _transparent_images()
    sample = Sample(images=images, question="Which scan is it?", options={"A": "yes", "B": "no"}, answer_label="A",
                    answer="yes", dataset_name="unit", dataset_index=0)
    engine = RecordingBackend()
    pool = RolloutPool([engine], [PromptRequest("p0", input_ids=[1], images=images, sample=sample, position=0)],
                       SamplingParams(n=2))
    (group,) = asyncio.run(_collect(pool))
    received = decode(encode(to_message(group, producer="w0", seq=0))).image_list()  # the learner's images

    image_processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2)
    processor = SimpleNamespace(image_processor=image_processor, image_token_id=99)
    _, learner = expand_image_tokens([1, *[99] * len(images), 2], received, processor)
    seen = image_processor(images=engine.images[0], return_tensors="pt")
    original = image_processor(images=images, return_tensors="pt")
    assert torch.equal(learner["image_grid_thw"], seen["image_grid_thw"])
    assert torch.equal(learner["pixel_values"], seen["pixel_values"])
    assert torch.equal(seen["pixel_values"], original["pixel_values"])  # as if the engine had the dataset's images
    assert [image.mode for image in engine.images[0]] == ["RGB"] * len(images)
    assert [np.asarray(image).tolist() for image in engine.images[0]] == [
        np.asarray(model_rgb(image)).tolist() for image in images]
