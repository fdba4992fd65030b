"""The questions a training run reads, from `DataConfig`: the bundled set or any source `load_samples` reads."""

from __future__ import annotations

import numpy as np

from medvl_engine.trainers.config import DataConfig


def load_dataset(cfg: DataConfig) -> list:
    """Samples in a fixed order (shuffled by `cfg.seed` when asked), cut to `cfg.max_samples`."""
    from medvl_engine.data import load_bundled, load_samples

    samples = list(load_bundled() if cfg.source == "bundled" else load_samples(cfg.source, split=cfg.split))
    if cfg.text_only:
        samples = [s for s in samples if not s.images]
    if not samples:
        raise ValueError(f"data.source {cfg.source!r} (split {cfg.split!r}) holds no samples"
                         + (" without images" if cfg.text_only else ""))
    if cfg.shuffle:
        order = np.random.default_rng(cfg.seed).permutation(len(samples))
        samples = [samples[i] for i in order]
    return samples[: cfg.max_samples] if cfg.max_samples else samples
