"""ScriptedBackend: a test double of the Backend interface with controlled delays, answers and faults.

It generates nothing: each call sleeps for a scripted delay and returns scripted answer texts (their
UTF-8 bytes as token ids), or raises, or hangs, as the script says for that prompt and attempt. It
records every call, and how many calls overlapped, so tests can check the pool's scheduling.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams


def correct_answer(request: PromptRequest, k: int) -> str:
    return f"<think>k={k}</think> <answer>{request.sample.answer_label}</answer>"


@dataclass
class Call:
    backend: str
    prompt_id: str
    version: int
    started: float
    ended: float | None = None
    outcome: str = "running"


class ScriptedBackend(Backend):
    """Test double. `faults[prompt_id]` lists, per attempt on this backend, "raise", "hang" or None (answer);
    `delays[prompt_id]` overrides `delay`; `answer(request, k)` gives the k-th answer's text."""

    name = "scripted"

    def __init__(self, label: str, *, delay: float = 0.0, delays: dict[str, float] | None = None,
                 faults: dict[str, list[str | None]] | None = None,
                 answer: Callable[[PromptRequest, int], str] = correct_answer, version: int = 0,
                 wrong_count: bool = False):
        self.label = label
        self.delay = delay
        self.delays = delays or {}
        self.faults = faults or {}
        self.answer = answer
        self.version = version
        self.wrong_count = wrong_count
        self.calls: list[Call] = []
        self.attempts: dict[str, int] = defaultdict(int)
        self.active = 0
        self.max_active = 0

    @property
    def weight_version(self) -> int:
        return self.version

    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        attempt = self.attempts[request.prompt_id]
        self.attempts[request.prompt_id] += 1
        script = self.faults.get(request.prompt_id, [])
        fault = script[attempt] if attempt < len(script) else None
        call = Call(self.label, request.prompt_id, self.version, time.perf_counter())
        self.calls.append(call)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delays.get(request.prompt_id, self.delay))
            if fault == "hang":
                await asyncio.sleep(3600)
            if fault == "raise":
                call.outcome = "raised"
                raise ConnectionError(f"scripted fault on {self.label} for {request.prompt_id}")
            count = params.n + 1 if self.wrong_count else params.n
            texts = [self.answer(request, k) for k in range(count)]
            call.outcome = "ok"
            return [
                Completion(token_ids=list(text.encode()), text=text, logprobs=[-0.5] * len(text.encode()),
                           finish_reason="stop", weight_version=self.version)
                for text in texts
            ]
        except asyncio.CancelledError:
            call.outcome = "cancelled"
            raise
        finally:
            call.ended = time.perf_counter()
            self.active -= 1

    async def update_weights_from_tensors(self, named_tensors, version: int) -> None:
        self.version = version

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        self.version = version

    async def pause(self) -> None:
        pass

    async def resume(self) -> None:
        pass

    async def release_memory(self) -> None:
        pass

    async def resume_memory(self) -> None:
        pass

    async def health(self) -> bool:
        return True

    async def shutdown(self) -> None:
        pass
