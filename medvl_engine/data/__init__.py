"""Data: the unified `Sample`, loaders from jsonl / parquet / Hugging Face datasets, and the bundled set."""

from medvl_engine.data.loaders import (
    SampleSet,
    bundled_answers_path,
    bundled_dataset_path,
    load_bundled,
    load_samples,
    sample_from_row,
)
from medvl_engine.data.sample import DataError, Sample

__all__ = [
    "DataError",
    "Sample",
    "SampleSet",
    "bundled_answers_path",
    "bundled_dataset_path",
    "load_bundled",
    "load_samples",
    "sample_from_row",
]
