"""What goes into a backend and what comes out: sampling parameters, a prompt request, a completion.

These are the nouns every backend (hf, sglang) and the RolloutPool share. They are plain dataclasses
checked in `__post_init__`, so a bad value fails where it is built, with its name, not three calls
later inside an engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from medvl_engine.data import Sample

FINISH_REASONS = ("stop", "length", "abort")


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the `n` answers of one prompt (one GRPO group).

    `temperature == 0` means greedy decoding (then `n` answers are identical unless the engine is
    nondeterministic). `top_k == -1` and `top_p == 1.0` disable those filters. `stop` strings end an
    answer; the answer's text excludes the stop string, its token ids keep the tokens that formed it
    (SGLang's default). `seed` makes a request reproducible on a given backend and device.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    return_logprobs: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"SamplingParams.n must be a positive int, got {self.n!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or a positive int, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"SamplingParams.stop must hold non-empty strings, got {s!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"SamplingParams.seed must be None or an int >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class PromptRequest:
    """One prompt to answer `n` times.

    `input_ids` is the chat-templated prompt as token ids (images as one placeholder token each, not
    expanded: the engine expands them); `text` is the same prompt as a string. At least one is given;
    the worker fills both so any backend can use the form it prefers. `images` are PIL images in the
    order their placeholders appear. `sample` is the dataset record the answers are scored against.
    `seed`, when given, overrides `SamplingParams.seed` for this request alone (a pool hands one
    SamplingParams to every request; the seed is what differs: `derive_seed(run_seed, position)`).
    `position` is the request's place in its PromptStream (-1: not from a stream).
    """

    prompt_id: str
    input_ids: list[int] | None = None
    text: str | None = None
    images: list[Any] = field(default_factory=list)
    sample: Sample | None = None
    seed: int | None = None
    position: int = -1

    def __post_init__(self):
        if not isinstance(self.prompt_id, str) or not self.prompt_id:
            raise ValueError(f"PromptRequest.prompt_id must be a non-empty string, got {self.prompt_id!r}")
        if self.input_ids is None and self.text is None:
            raise ValueError(f"PromptRequest {self.prompt_id!r}: give input_ids or text (both are None)")
        if self.input_ids is not None:
            self.input_ids = [int(t) for t in self.input_ids]
            if not self.input_ids:
                raise ValueError(f"PromptRequest {self.prompt_id!r}: input_ids is empty")
            if min(self.input_ids) < 0:
                raise ValueError(f"PromptRequest {self.prompt_id!r}: input_ids holds a negative id")
        self.images = list(self.images or [])
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"PromptRequest {self.prompt_id!r}: seed must be None or an int >= 0, got {self.seed!r}")

    def seed_for(self, params: SamplingParams) -> int | None:
        """The seed this request samples with: its own, else the shared `params.seed`."""
        return self.seed if self.seed is not None else params.seed


def derive_seed(base: int, index: int) -> int:
    """A seed for item `index` of a run seeded `base` (31 bits: every engine takes it).

    Hashed, not `base + index`: runs with seeds 0 and 1 would otherwise share all but one stream.
    """
    if base < 0 or index < 0:
        raise ValueError(f"derive_seed: base and index must be >= 0, got {base}, {index}")
    return int(np.random.SeedSequence([base, index]).generate_state(1)[0] & 0x7FFFFFFF)


@dataclass
class Completion:
    """One answer: its token ids, text, the engine's log-probs of those tokens, and where it came from.

    `logprobs[i]` is the engine's log-probability of `token_ids[i]` (None when not requested);
    `finish_reason` is one of "stop" (end-of-sequence token or stop string), "length"
    (max_new_tokens reached) or "abort"; `weight_version` is the policy version that produced it.
    """

    token_ids: np.ndarray
    text: str
    logprobs: np.ndarray | None
    finish_reason: str
    weight_version: int

    def __post_init__(self):
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int32).reshape(-1)
        if self.logprobs is not None:
            self.logprobs = np.ascontiguousarray(self.logprobs, dtype=np.float32).reshape(-1)
            if self.logprobs.shape != self.token_ids.shape:
                raise ValueError(
                    f"Completion: {self.logprobs.size} log-probs for {self.token_ids.size} tokens (must be equal)"
                )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"Completion.finish_reason must be one of {FINISH_REASONS}, got {self.finish_reason!r}")
        self.weight_version = int(self.weight_version)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)
