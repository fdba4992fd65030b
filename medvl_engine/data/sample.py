"""The unified record every part of the engine speaks: one multiple-choice question (MedVLThinker's schema).

A `Sample` is checked when it is built, so code downstream (prompts, scoring, training) never meets a
question whose answer label is not among its options or whose answer text disagrees with that option.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from medvl_engine.errors import DataError  # defined there; imported from here too


@dataclass(frozen=True)
class Sample:
    """One question: images (possibly none), question text, options letter -> text in stored order,
    the correct letter and its text, an optional reasoning trace (the SFT target), and where it came from.

    `dataset_index` is the join key used everywhere (answers, rollouts, pass counts); -1 means unset.
    """

    images: list
    question: str
    options: dict[str, str]
    answer_label: str
    answer: str
    reasoning: str | None = None
    dataset_name: str = ""
    dataset_index: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.images, list):
            raise TypeError(f"field 'images': expected a list of PIL images, got {type(self.images).__name__}")
        for i, image in enumerate(self.images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"field 'images'[{i}]: expected a PIL image, got {type(image).__name__}")
        for field in ("question", "answer_label", "answer", "dataset_name"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(f"field {field!r}: expected str, got {type(value).__name__}")
        if not self.question.strip():
            raise DataError("field 'question': empty")
        if self.reasoning is not None and not isinstance(self.reasoning, str):
            raise TypeError(f"field 'reasoning': expected str or None, got {type(self.reasoning).__name__}")
        if isinstance(self.dataset_index, bool) or not isinstance(self.dataset_index, int):
            raise TypeError(f"field 'dataset_index': expected int, got {type(self.dataset_index).__name__}")
        if self.dataset_index < -1:
            raise DataError(f"field 'dataset_index': {self.dataset_index} is negative (use -1 for unset)")
        self._check_options()

    def _check_options(self) -> None:
        if not isinstance(self.options, dict):
            raise TypeError(f"field 'options': expected a dict letter -> text, got {type(self.options).__name__}")
        if not self.options:
            raise DataError("field 'options': empty")
        for letter, text in self.options.items():
            if not isinstance(letter, str) or not letter or letter != letter.strip():
                raise DataError(f"field 'options': key {letter!r} is not a letter (non-empty, no surrounding spaces)")
            if not isinstance(text, str):
                raise DataError(f"field 'options': option {letter} is {type(text).__name__}, expected str")
        if self.answer_label not in self.options:
            raise DataError(
                f"field 'answer_label': {self.answer_label!r} is not among the options {list(self.options)}"
            )
        # The graders accept the letter, the option text or "{letter}. {text}", compared after strip()
        # and lower(); an answer text that differs from its option under that rule would grade the
        # same response two ways depending on which field a caller passes.
        option_text = self.options[self.answer_label]
        if self.answer.strip().lower() != option_text.strip().lower():
            raise DataError(
                f"field 'answer': {self.answer!r} is not the text of option {self.answer_label} ({option_text!r})"
            )
