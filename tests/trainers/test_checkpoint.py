"""Resuming reads the checkpoint's own files (client state, RNG states) with torch's weights-only unpickler:
what a checkpoint of ours holds loads, and a file that would run code when unpickled is refused.
(Once both were read with `weights_only=False`: a checkpoint folder from elsewhere could run anything.)"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvl_engine.trainers.checkpoint import load_checkpoint, rng_state


class Touch:
    """Unpickling this creates a file: code that ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def fake_checkpoint(run_dir: Path, client_state: dict) -> SimpleNamespace:
    tag = run_dir / "checkpoints" / "step_000001"
    tag.mkdir(parents=True)
    torch.save(client_state, tag / "client_state.pt")
    torch.save(rng_state(), tag / "rng_rank0.pt")
    # DeepSpeed's part of the checkpoint is DeepSpeed's: a stand-in engine that says it loaded.
    return SimpleNamespace(rank=0, engine=SimpleNamespace(load_checkpoint=lambda root, tag: (f"{root}/{tag}", {})))


def test_a_checkpoint_of_ours_loads_and_restores_the_rng(tmp_path):
    state = {"step": 1, "weight_version": 3, "source": {"position": 96, "seqs": {"rollout-0": 48}},
             "config": {"algo": {"lr": 1e-6, "clip": [0.2, 0.28]}, "model": {"path": "smollm2"}}}
    learner = fake_checkpoint(tmp_path, state)
    expected = (random.random(), np.random.random(), torch.rand(1).item())
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    assert load_checkpoint(learner, tmp_path) == state
    assert (random.random(), np.random.random(), torch.rand(1).item()) == expected


def test_a_checkpoint_file_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    learner = fake_checkpoint(tmp_path / "run", {"step": 1, "config": Touch(marker)})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(learner, tmp_path / "run")
    assert not marker.exists()
