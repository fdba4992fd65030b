"""What a prompt request is checked for when the stream builds it, before anything is generated: its image
placeholders pair up with its images, and its length with the image tokens expanded (the learner's rule)
fits rollout.max_prompt_tokens. Each error names the row and the prompt."""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from tiny_models import qwen_tokenizer, qwen_vl_processor

from medvl_engine.data import Sample
from medvl_engine.errors import ConfigError, DataError
from medvl_engine.prompts import render_prompt
from medvl_engine.rollout.stream import PromptStream, build_request
from medvl_engine.vision import expand_image_tokens


@pytest.fixture(scope="module")
def processor():
    return qwen_vl_processor()


def _png(width: int, height: int) -> Image.Image:
    """A lazily decoded PNG, as the loaders hand images out."""
    pixels = np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()))


def _sample(images=(), question="What is shown?", options=None) -> Sample:
    options = options or {"A": "yes", "B": "no"}
    return Sample(images=list(images), question=question, options=options, answer_label="A", answer="yes",
                  dataset_name="unit", dataset_index=3)


def test_a_placeholder_in_a_row_without_images_is_reported_with_its_row_and_field(processor):
    sample = _sample(question="What is shown in <|image_pad|>?")
    with pytest.raises(DataError, match=r"^unit\[3\] \(prompt unit/3@0\): the prompt has 1 image placeholder\(s\) "
                                        r"for 0 image\(s\); the row's text holds the placeholder '<\|image_pad\|>' "
                                        r"\(field 'question'\)$"):
        build_request(processor, sample, "unit/3@0")
    stream = PromptStream([sample], processor, shuffle_seed=None, sample_seed=0)
    with pytest.raises(DataError, match="field 'question'"):
        next(stream.requests())


def test_a_placeholder_in_an_option_of_a_row_with_images_is_one_too_many(processor):
    sample = _sample([_png(32, 32)], options={"A": "yes", "B": "no, see <|image_pad|>"})
    with pytest.raises(DataError, match=r"2 image placeholder\(s\) for 1 image\(s\).*\(field 'options'\[B\]\)$"):
        build_request(processor, sample, "p")


def test_images_the_rendered_prompt_has_no_placeholder_for_are_an_error(processor):
    # Prompts place images through the chat template, one placeholder per image part (prompts.build_messages):
    # the row's text needs none, but a render that drops the image parts leaves the images without one.
    sample = _sample([_png(32, 32), _png(40, 32)])
    build_request(processor, sample, "p")  # the template's placeholders: fine
    with pytest.raises(DataError, match=r"^unit\[3\] \(prompt p\): the prompt has 0 image placeholder\(s\) for 2 "
                                        r"image\(s\)$"):
        build_request(processor, sample, "p", render=lambda r, s: render_prompt(r, replace(s, images=[])))


def test_a_text_models_tokenizer_names_no_image_token():
    # A text model has no image features to mismatch: its tokenizer's "<|image_pad|>" is only a token.
    request = build_request(qwen_tokenizer(), _sample(question="What is <|image_pad|>?"), "p")
    assert request.images == []


def test_the_prompt_length_counts_image_tokens_before_generation_as_the_learner_does(processor):
    from medvl_engine.trainers.rollout_batch import RolloutBatch
    from medvl_engine.transport.messages import RolloutGroup

    sample = _sample([_png(448, 448), _png(100, 60)])
    text_ids = processor.tokenizer(render_prompt(processor, sample), add_special_tokens=False)["input_ids"]
    expanded, _ = expand_image_tokens(text_ids, sample.images, processor)
    # 448x448 is 32x32 patches, 256 tokens after the 2x2 merge; 100x60 is resized to 112x56, 8 tokens.
    assert len(expanded) == len(text_ids) - 2 + 256 + 8
    fresh = _sample([_png(448, 448), _png(100, 60)])  # undecoded: the check reads the sizes only
    request = build_request(processor, fresh, "p", max_prompt_tokens=len(expanded))
    assert request.input_ids == text_ids and all(image.tile for image in fresh.images)
    limit = len(expanded) - 1  # the unexpanded prompt fits it by far
    with pytest.raises(ConfigError, match=rf"^unit\[3\] \(prompt unit/3@0\): the prompt has {len(expanded)} tokens "
                                          rf"\({len(text_ids)} \+ the tokens of 2 image\(s\)\) > "
                                          rf"rollout.max_prompt_tokens {limit} \(prompts are never truncated\)$"):
        next(PromptStream([sample], processor, shuffle_seed=None, sample_seed=0, max_prompt_tokens=limit).requests())

    # The learner draws the line at the same place.
    def group(ids) -> RolloutGroup:
        return RolloutGroup.build(producer="w", seq=0, prompt_id="p", dataset_name="unit", dataset_index=3,
                                  weight_version=0, answer_label="A", prompt_ids=ids, response_ids=[[7]],
                                  logprobs=[None], texts=["x"], finish_reasons=["stop"], rewards=[0.0],
                                  correct=[False], format_ok=[False], letters=[""], images=sample.images)

    RolloutBatch.from_groups([group(text_ids)], max_prompt_tokens=len(expanded), max_response_tokens=4,
                             processor=processor)
    with pytest.raises(ConfigError, match=f"prompt of {len(expanded)} tokens > rollout.max_prompt_tokens {limit}"):
        RolloutBatch.from_groups([group(text_ids)], max_prompt_tokens=limit, max_response_tokens=4,
                                 processor=processor)
