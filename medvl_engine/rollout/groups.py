"""A finished GRPO group (`ScoredGroup`), a prompt whose every attempt failed (`FailedPrompt`), and
their wire form: the transport messages (`RolloutGroup`, `RolloutError`) a learner or a sink receives.

    async for item in pool.stream():  # a RolloutPool's output
        if isinstance(item, FailedPrompt): send(failed_message(item, producer="w0", seq=seq))
        else: send(to_message(item, producer="w0", seq=seq))  # a ScoredGroup

`is_constant` tells a group that carries no GRPO signal (every reward equal); the learner's dynamic
sampling (`medvl_engine.trainers.sources.OrderedSource`) drops those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medvl_engine.rollout.types import Completion, PromptRequest
from medvl_engine.transport.messages import RolloutGroup


@dataclass
class ScoredGroup:
    """The `n` scored answers of one prompt, ready for a learner or a sink."""

    request: PromptRequest
    completions: list[Completion]
    rewards: np.ndarray  # float32 [n]
    correct: np.ndarray  # bool [n]
    format_ok: np.ndarray  # bool [n]
    letters: list[str]  # the option letter each answer maps to ("" when none)
    parsed: list[str]  # the extracted answer of each answer (the parser mode's extraction, not lowered)
    weight_version: int  # the oldest policy version among the answers
    attempts: int = 1
    started: float = 0.0  # wall clock (time.time()) when its successful attempt started, for the run's timeline
    finished: float = 0.0  # ... and when it was scored

    def __post_init__(self):
        n = len(self.completions)
        if n == 0:
            raise ValueError(f"ScoredGroup {self.request.prompt_id!r}: no completions")
        for name in ("rewards", "correct", "format_ok", "letters", "parsed"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"ScoredGroup {self.request.prompt_id!r}: {name} has "
                                 f"{len(getattr(self, name))} entries for {n} completions")

    @property
    def n(self) -> int:
        return len(self.completions)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.completions)


def is_constant(rewards) -> bool:
    """True when every reward of a group is the same (no GRPO signal): the one dynamic-sampling test."""
    rewards = np.asarray(rewards)
    return bool(rewards.size == 0 or np.all(rewards == rewards.flat[0]))


@dataclass
class FailedPrompt:
    """A prompt whose every attempt failed; `errors` holds one line per attempt, `reason` the last."""

    request: PromptRequest
    reason: str
    attempts: int
    errors: tuple[str, ...] = ()


def to_message(group: ScoredGroup, producer: str, seq: int) -> RolloutGroup:
    """The wire form of a scored group (token ids and log-probs as raw buffers)."""
    request = group.request
    if request.input_ids is None:
        raise ValueError(f"to_message: prompt {request.prompt_id!r} has no input_ids; the learner needs the "
                         "prompt's token ids (build PromptRequest with input_ids)")
    sample = request.sample
    return RolloutGroup.build(
        producer=producer,
        seq=seq,
        prompt_id=request.prompt_id,
        dataset_name=sample.dataset_name if sample is not None else "",
        dataset_index=sample.dataset_index if sample is not None else -1,
        weight_version=group.weight_version,
        answer_label=sample.answer_label if sample is not None else "",
        prompt_ids=request.input_ids,
        response_ids=[c.token_ids for c in group.completions],
        logprobs=[c.logprobs for c in group.completions],
        texts=[c.text for c in group.completions],
        finish_reasons=[c.finish_reason for c in group.completions],
        rewards=group.rewards,
        correct=group.correct,
        format_ok=group.format_ok,
        letters=group.letters,
        parsed=group.parsed,
        position=request.position,
        seed=request.seed,
        images=request.images,
        started=group.started,
        finished=group.finished,
    )


def failed_message(item: FailedPrompt, producer: str, seq: int):
    """The wire form of a prompt whose every attempt failed: it takes its sequence number like a group."""
    from medvl_engine.transport.messages import RolloutError

    return RolloutError(producer=producer, seq=seq, prompt_id=item.request.prompt_id, reason=item.reason,
                        attempts=item.attempts, position=item.request.position)
