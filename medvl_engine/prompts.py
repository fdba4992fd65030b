"""MedVLThinker's prompt layout, byte for byte: the instruction, the user text, the chat messages and
the SFT target.

    messages = build_messages(sample)            # one user message: image parts, then the text
    prompt = render_prompt(processor, sample)    # chat template applied, generation prompt added
    target = sft_target(sample)                  # "<think> ... </think>\\n<answer> B </answer>"

The user text is
``{INSTRUCTION}\\n\\nQuestion: {question}\\n\\nOptions:`` followed by ``\\n\\n{letter}. {text}`` per
option in stored order (real newlines). There is no system message: the chat template adds its own
default (Qwen2.5-VL's "You are a helpful assistant."), as MedVLThinker's evaluation and RL data do.
"""

from __future__ import annotations

from medvl_engine.data.sample import Sample
from medvl_engine.errors import ConfigError, DataError

# A raw string in MedVLThinker: the "\n" after "answer." is the two characters backslash and n, not a
# newline, in every prompt its models were trained and evaluated on.
INSTRUCTION = (
    r"You will solve a problem/request. You should provide your thoughts within <think> </think> tags before"
    r" providing the answer.\nWrite your final answer within <answer> </answer> tags."
)


def prompt_text(sample: Sample) -> str:
    """The user text: instruction, question and the lettered options."""
    text = f"{INSTRUCTION}\n\nQuestion: {sample.question}\n\nOptions:"
    for letter, option in sample.options.items():
        text += f"\n\n{letter}. {option}"
    return text


def build_messages(sample: Sample) -> list[dict]:
    """One user message. With images its content is a part list, one ``{"type": "image", "image": PIL}``
    per image in order and then the text part; a text-only sample gets plain string content, which
    every chat template renders (ChatML templates such as SmolLM2's print list content verbatim)."""
    text = prompt_text(sample)
    if not sample.images:
        return [{"role": "user", "content": text}]
    parts: list[dict] = [{"type": "image", "image": image} for image in sample.images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def render_vqa_prompt(tokenizer_or_processor, sample: Sample) -> str:
    """A free-form VQA prompt (instruction-tuning rows such as PubMedVision's): the sample's images and its
    question alone, no MedVLThinker instruction and no options, through the chat template."""
    content = sample.question if not sample.images else (
        [{"type": "image", "image": image} for image in sample.images] + [{"type": "text", "text": sample.question}])
    rendered = tokenizer_or_processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                          add_generation_prompt=True)
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered


def render_prompt(tokenizer_or_processor, sample: Sample) -> str:
    """The prompt string the model sees: the chat template applied to `build_messages(sample)` with the
    generation prompt added (images appear as the template's placeholders, e.g. Qwen's
    ``<|vision_start|><|image_pad|><|vision_end|>``)."""
    template = getattr(tokenizer_or_processor, "chat_template", None)
    template = str(template) if isinstance(template, dict) else template  # named templates
    if not template:
        raise ConfigError(f"{type(tokenizer_or_processor).__name__} has no chat template to render a prompt with")
    if sample.images and "image" not in template:
        raise ConfigError(
            f"sample {sample.dataset_index} of {sample.dataset_name or 'unnamed dataset'} has "
            f"{len(sample.images)} image(s) but the chat template of {type(tokenizer_or_processor).__name__} "
            "has no image placeholder: for a text-only model use --data.text-only (drop such questions) or "
            "--data.ignore-images (keep them without their images); an image-text model needs its processor"
        )
    rendered = tokenizer_or_processor.apply_chat_template(
        build_messages(sample), tokenize=False, add_generation_prompt=True
    )
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template returned {type(rendered).__name__}, expected str")
    return rendered


def sft_target(sample: Sample) -> str:
    """The assistant turn for SFT: the reasoning in think tags, then the letter only in answer tags."""
    if sample.reasoning is None:
        where = sample.dataset_name or "unnamed dataset"
        raise DataError(f"sample {sample.dataset_index} of {where} has no reasoning to build an SFT target from")
    return f"<think> {sample.reasoning.strip()} </think>\n<answer> {sample.answer_label.strip()} </answer>"
