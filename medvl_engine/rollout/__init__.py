"""Rollout: backends that generate answers, the RolloutPool that keeps them busy and scores the groups,
the `rollout-worker` command that streams them to a learner, and its process supervisor.

Importing this package loads no engine: `hf_backend` (torch, transformers) and `sglang_backend` are
imported when a backend is built (`make_backend`).
"""

from medvl_engine.rollout.backend import Backend, make_backend
from medvl_engine.rollout.groups import FailedPrompt, ScoredGroup, to_message
from medvl_engine.rollout.pool import PoolStats, RolloutPool
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams, derive_seed

__all__ = [
    "Backend",
    "Completion",
    "FailedPrompt",
    "PoolStats",
    "PromptRequest",
    "RolloutPool",
    "SamplingParams",
    "ScoredGroup",
    "derive_seed",
    "make_backend",
    "to_message",
]
