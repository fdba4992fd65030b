"""A damaged image is reported for its own row or question and never takes other questions down.

A truncated PNG is caught when the dataset loads (PIL's structural check names file, row and field);
an image that only fails to decode (a truncated JPEG) is caught by the rollout pool before a backend
sees it, so a batching backend's other prompts still generate.
"""

from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest
from PIL import Image
from scripted_backend import ScriptedBackend, correct_answer

from medvl_engine.data import DataError, Sample, load_samples
from medvl_engine.rollout.groups import FailedPrompt, ScoredGroup
from medvl_engine.rollout.pool import RolloutPool
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams


def _encoded(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def _row(index: int, image: str) -> dict:
    return {"dataset_name": "unit", "dataset_index": index, "question": f"What is shown in scan {index}?",
            "options": {"A": "yes", "B": "no"}, "answer_label": "A", "answer": "yes", "images": [image]}


def _dataset(tmp_path, broken_row: int, rows: int = 3) -> str:
    (tmp_path / "img").mkdir()
    for i in range(rows):
        data = _encoded("PNG", i)
        (tmp_path / "img" / f"{i}.png").write_bytes(data[: len(data) // 2] if i == broken_row else data)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(_row(i, f"img/{i}.png")) + "\n" for i in range(rows)))
    return str(path)


def test_a_truncated_png_is_reported_at_load_with_file_row_and_field(tmp_path):
    path = _dataset(tmp_path, broken_row=1)
    with pytest.raises(DataError) as err:
        load_samples(path)
    message = str(err.value)
    assert "questions.jsonl: row 1 (line 2)" in message
    assert "field 'images'[0]" in message and "not a readable image" in message


def test_skip_invalid_drops_only_the_row_with_the_truncated_png_and_counts_it(tmp_path):
    samples = load_samples(_dataset(tmp_path, broken_row=1), skip_invalid=True)
    assert [s.dataset_index for s in samples] == [0, 2]
    assert len(samples.skipped) == 1 and samples.skipped[0][0] == 1
    assert "skipped 1 of 3 rows" in samples.skipped_summary()
    for sample in samples:
        sample.images[0].load()  # the rows kept decode


class BatchingBackend(ScriptedBackend):
    """Gathers the prompts that arrive together into one batch and decodes all their images, as the hf
    backend's processor does: one image that does not decode fails every prompt of its batch."""

    name = "batching"

    def __init__(self):
        super().__init__("batching")
        self.pending: list[tuple[PromptRequest, SamplingParams, asyncio.Future]] = []
        self.batches: list[list[str]] = []

    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((request, params, future))
        if len(self.pending) == 1:
            asyncio.get_running_loop().call_later(0.02, self._run_batch)
        return await future

    def _run_batch(self) -> None:
        batch, self.pending = self.pending, []
        self.batches.append([request.prompt_id for request, _, _ in batch])
        try:
            for request, _, _ in batch:
                for image in request.images:
                    image.load()
        except OSError as exc:
            for _, _, future in batch:
                future.set_exception(RuntimeError(f"batch failed: {exc}"))
            return
        for request, params, future in batch:
            texts = [correct_answer(request, k) for k in range(params.n)]
            future.set_result([Completion(token_ids=list(t.encode()), text=t, logprobs=[-0.5] * len(t.encode()),
                                          finish_reason="stop", weight_version=0) for t in texts])


def _request(i: int, data: bytes) -> PromptRequest:
    sample = Sample(images=[Image.open(io.BytesIO(data))], question=f"question {i}?",
                    options={"A": "yes", "B": "no"}, answer_label="A", answer="yes", dataset_name="unit",
                    dataset_index=i)
    return PromptRequest(f"p{i}", input_ids=[1, 2, i], text=f"question {i}?", images=list(sample.images),
                         sample=sample, position=i)


def test_an_image_that_does_not_decode_fails_alone_and_the_rest_of_its_batch_generates():
    # A truncated JPEG opens and passes PIL's structural check; only decoding finds it.
    jpeg = _encoded("JPEG", 7)
    requests = [_request(i, jpeg[: len(jpeg) // 2] if i == 2 else _encoded("JPEG", i)) for i in range(5)]
    backend = BatchingBackend()
    pool = RolloutPool([backend], requests, SamplingParams(n=2, temperature=1.0, max_new_tokens=8),
                       max_in_flight=8, retries=2)

    async def collect():
        return [item async for item in pool.stream()]

    items = asyncio.run(asyncio.wait_for(collect(), timeout=20))
    failed = [item for item in items if isinstance(item, FailedPrompt)]
    groups = [item for item in items if isinstance(item, ScoredGroup)]
    assert [f.request.prompt_id for f in failed] == ["p2"]
    assert failed[0].attempts == 0
    assert "unit[2]" in failed[0].reason and "image 0 cannot be decoded" in failed[0].reason
    assert sorted(g.request.prompt_id for g in groups) == ["p0", "p1", "p3", "p4"]
    assert all(g.attempts == 1 for g in groups)  # no retry: nothing in their batch failed
    assert not any("p2" in batch for batch in backend.batches)
    assert pool.stats.failed == 1 and pool.stats.retried_attempts == 0
