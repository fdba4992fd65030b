"""Fixtures of the build-data tests (the data and helpers live in databuild_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from databuild_helpers import HashedWordsEncoder, write_source


@pytest.fixture
def caption_source(tmp_path) -> Path:
    return write_source(tmp_path / "src")


@pytest.fixture
def words_encoder() -> HashedWordsEncoder:
    return HashedWordsEncoder()
