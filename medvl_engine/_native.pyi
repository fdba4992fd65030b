"""Typing stub of the C++ extension medvl_engine._native (csrc/); the public API is medvl_engine.rewards."""

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

SOURCE_HASH: str
ABI_VERSION: int
UNICODE_VERSION: str
MAX_LOWER_EXPANSION: int
WHITESPACE: tuple[int, ...]
IGNORECASE_CLASSES: dict[str, tuple[int, ...]]

def score(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_labels: Sequence[str],
    options: Sequence[Mapping[str, str] | None] | None,
    mode: str,
    threads: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_], npt.NDArray[np.bool_], list[str], list[str]]: ...
def lower(s: str) -> str: ...
def strip(s: str) -> str: ...
