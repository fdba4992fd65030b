"""DeepSpeed checkpoints that resume exactly, and the export to a Hugging Face folder.

A checkpoint is DeepSpeed's own folder (`run_dir/checkpoints/step_000012/`: module, optimizer and
scheduler states, per rank) plus a client state holding what the run needs to continue as if it
had never stopped: the step, the data position, the weight version, the run config and the RNG
states of python, numpy and torch (CPU and every CUDA device) of each rank.

    save_checkpoint(learner, run_dir, step, {"data_position": 96, "weight_version": 12, ...})
    state = load_checkpoint(learner, run_dir)      # the latest, or None when there is none
    export_hf(learner, run_dir / "export")          # config + tokenizer + safetensors
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medvl_engine import run_folder
from medvl_engine.errors import RunFolderError

try:
    from numpy._core.multiarray import _reconstruct  # numpy >= 2
except ImportError:
    from numpy.core.multiarray import _reconstruct

logger = logging.getLogger(__name__)

_TAG_PREFIX = "step_"
CONFIG_NAME = run_folder.CONFIG
# What a resumed run may change without --allow-changes: how long it runs, what it logs and profiles, when
# it checkpoints, where its run folder is and the switches of the invocation (`resume`, `overwrite`,
# `allow_changes`, never saved into config.yaml), and where its rollout workers run and connect (the
# stream's order and seeds do not depend on placement). Everything else (model, optimizer, data, rollout,
# algorithm, credits, seeds) shapes the training the checkpoint continues. (With a cosine schedule a longer
# run stretches the remaining decay: the schedule follows the new total.)
RESUME_VOLATILE = ("output", "resume", "overwrite", "allow_changes",
                   "steps", "epochs", "max_steps", "logging", "checkpoint.every", "checkpoint.keep",
                   "checkpoint.export", "checkpoint.final", "transport.endpoint", "transport.workers", "transport.keys",
                   "transport.sync_bucket_mb", "profile")
# What `np.random.get_state()` pickles beyond plain values: one uint32 array.
_NUMPY_RNG_GLOBALS = [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / run_folder.CHECKPOINTS


def tags(run_dir: str | Path) -> list[str]:
    """Complete checkpoints, oldest first (DeepSpeed writes `latest` last, so a crash mid-save is skipped)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(_TAG_PREFIX)
             and (p / "client_state.pt").is_file()]
    return sorted(found)


class _NotSet:
    """A setting one config has and the other lacks (a key added to the engine after the folder was written)."""

    def __repr__(self) -> str:
        return "(not set)"


def changed_settings(saved: dict, current: dict, volatile: tuple[str, ...] = RESUME_VOLATILE,
                     prefix: str = "") -> list[str]:
    """`key: old -> new` for every setting that differs between two config dicts, except `volatile` ones
    (a dotted key, or a whole section by its name)."""
    lines = []
    for key in sorted(set(saved) | set(current), key=str):
        name = f"{prefix}{key}"
        if name in volatile:
            continue
        old, new = saved.get(key, _NotSet()), current.get(key, _NotSet())
        if isinstance(old, dict) and isinstance(new, dict):
            lines += changed_settings(old, new, volatile, f"{name}.")
        elif old != new:
            lines.append(f"{name}: {old!r} -> {new!r}")
    return lines


def check_resume_settings(run_dir: str | Path, config: dict, *, allow_changes: bool = False) -> list[str]:
    """Compare the settings of a resumed run with those the run folder was trained with (its config.yaml);
    returns the changes. A change outside RESUME_VOLATILE is refused unless `allow_changes`."""
    import yaml

    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        if allow_changes:
            return []
        raise RunFolderError(f"--resume: {path} is missing, so the settings of the run cannot be checked "
                             "(--allow-changes resumes without the check)")
    changes = changed_settings(yaml.safe_load(path.read_text()) or {}, config)
    if changes and not allow_changes:
        raise RunFolderError(f"--resume: the settings differ from those the run in {run_dir} was trained with "
                             f"({path.name}): {'; '.join(changes)}. Resume with the same settings, or pass "
                             "--allow-changes to continue with the new ones.")
    return changes


def prepare_run_dir(run_dir: str | Path, *, resume: bool, overwrite: bool = False, config: dict | None = None,
                    allow_changes: bool = False) -> None:
    """Check the run folder before anything starts (no model, no DeepSpeed yet).

    `resume` needs a complete checkpoint there and, when `config` (the run's settings as a dict) is given,
    the settings the folder was trained with: a change outside RESUME_VOLATILE is refused unless
    `allow_changes` (then logged as a warning). A new run refuses a folder an earlier run used (its checkpoints,
    weights and logs would mix with this run's: checkpoint rotation would even delete the new run's
    checkpoints and keep the old one's) unless `overwrite`, which removes it only when medvl-engine wrote
    it (its config.yaml is there), and only on rank 0.
    """
    import os

    run_dir = Path(run_dir)
    if resume:
        if not tags(run_dir):
            raise RunFolderError(f"--resume: no complete checkpoint under {checkpoint_dir(run_dir)} (drop --resume "
                                 "to start a new run)")
        if config is not None:
            changes = check_resume_settings(run_dir, config, allow_changes=allow_changes)
            if changes and int(os.environ.get("RANK", "0")) == 0:
                logger.warning("--resume --allow-changes: continuing %s with changed settings: %s", run_dir,
                               "; ".join(changes))
        return
    used = [name for name in run_folder.TRAINING_OUTPUTS if (run_dir / name).exists()]
    if not used:
        return
    if not overwrite:
        raise RunFolderError(f"{run_dir} holds an earlier run ({', '.join(used)}): --resume continues it, --overwrite "
                             "replaces it, or choose another --output")
    if not (run_dir / CONFIG_NAME).is_file():
        raise RunFolderError(f"--overwrite: {run_dir} has no {CONFIG_NAME}, so medvl-engine did not write it; "
                             "remove it yourself or choose another --output")
    if int(os.environ.get("RANK", "0")) == 0:
        shutil.rmtree(run_dir)


def save_checkpoint(learner, run_dir: str | Path, step: int, client_state: dict[str, Any], *, keep: int = 2) -> Path:
    """Save the engine and `client_state` (plus this rank's RNG states) as tag `step_{step:06d}`."""
    import torch.distributed as dist

    tag = f"{_TAG_PREFIX}{step:06d}"
    root = checkpoint_dir(run_dir)
    state = dict(client_state, step=step)
    learner.engine.save_checkpoint(str(root), tag=tag, client_state={"step": step})
    # RNG states differ per rank, DeepSpeed's client state is written by rank 0 only: one file per rank.
    torch.save(rng_state(), root / tag / f"rng_rank{learner.rank}.pt")
    if dist.is_initialized():
        dist.barrier()
    if learner.rank == 0:
        torch.save(state, root / tag / "client_state.pt")  # written last: marks the checkpoint complete
        for old in tags(run_dir)[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return root / tag


def load_checkpoint(learner, run_dir: str | Path, tag: str | None = None) -> dict[str, Any] | None:
    """Restore the latest (or the named) checkpoint into `learner`; returns its client state, or None."""
    available = tags(run_dir)
    if tag is None:
        if not available:
            return None
        tag = available[-1]
    elif tag not in available:
        raise FileNotFoundError(f"checkpoint {tag!r} not found under {checkpoint_dir(run_dir)} (have {available})")
    root = checkpoint_dir(run_dir)
    path, _ = learner.engine.load_checkpoint(str(root), tag=tag)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    state = _load(root / tag / "client_state.pt")
    rng_file = root / tag / f"rng_rank{learner.rank}.pt"
    if not rng_file.is_file():
        raise FileNotFoundError(f"{rng_file} is missing: the checkpoint was written with fewer ranks")
    set_rng_state(_load(rng_file))
    return state


def _load(path: Path) -> Any:
    """A file of ours, read by torch's weights-only unpickler: tensors, numbers, strings and containers, plus
    the uint32 array of numpy's RNG state; any other object in the file is refused, so a checkpoint folder
    from elsewhere cannot run code when a run resumes from it. (DeepSpeed reads its own model and optimizer
    files in `engine.load_checkpoint` with its own torch.load.)"""
    with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS):
        return torch.load(path, weights_only=True)


def export_hf(learner, folder: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Write a Hugging Face folder (config, tokenizer, safetensors) that transformers and the backends load.

    Collective under ZeRO-3 (every rank gathers); only rank 0 writes.
    """
    folder = Path(folder)
    state = learner.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    if learner.rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        learner.module.save_pretrained(folder, state_dict=state, safe_serialization=True)
        learner.tokenizer.save_pretrained(folder)
        if learner.processor is not None:  # an image-text policy: the image processor and chat template too
            learner.processor.save_pretrained(folder)
    return folder
