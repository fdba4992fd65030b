"""Where a GRPO step's groups come from: the rollout workers' stream, or a backend in this process.

Both hand out `RolloutGroup` messages and keep a position a checkpoint can save and a resumed run
can restore, so the run after `--resume` consumes exactly the groups the uninterrupted run would.

- `StreamSource`: a `GroupReceiver` on the transport (rank 0 receives, every rank gets the same
  groups); drops groups more than `max_staleness` versions behind and, with dynamic sampling,
  groups whose rewards are all equal; counts both and the workers' `RolloutError`s.
- `LocalSource`: answers the dataset's questions with a backend in this process (the hf backend
  sharing the machine with the learner), scored with the native scorer. Position k of the data
  stream is always the same question sampled with the same seed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from medvl_engine.transport.messages import RolloutError, RolloutGroup


@dataclass
class SourceStats:
    received: int = 0
    stale: int = 0
    constant: int = 0
    errors: int = 0
    error_reasons: list[str] = field(default_factory=list)


def is_constant(group: RolloutGroup) -> bool:
    rewards = group.reward_array()
    return bool(rewards.size == 0 or np.all(rewards == rewards[0]))


def _share(groups: list | None) -> list:
    """Rank 0's groups on every rank (one broadcast of the encoded messages)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return groups
    from medvl_engine.transport.messages import decode, encode

    payload = [[encode(g) for g in groups] if groups is not None else None]
    dist.broadcast_object_list(payload, src=0)
    return [decode(b) for b in payload[0]]


class StreamSource:
    """Groups from rollout workers over ZeroMQ (`GroupReceiver`); only rank 0 holds a receiver."""

    def __init__(self, receiver, *, rank: int, max_staleness: int, dynamic_sampling: bool, timeout: float = 600.0,
                 workers: list | None = None):
        self.receiver = receiver
        self.workers = list(workers or [])
        self.rank = rank
        self.max_staleness = max_staleness
        self.dynamic_sampling = dynamic_sampling
        self.timeout = timeout
        self.stats = SourceStats()

    def next(self, count: int, version: int) -> list[RolloutGroup]:
        groups = None
        if self.rank == 0:
            groups = []
            while len(groups) < count:
                msg = self._recv()
                if isinstance(msg, RolloutError):
                    self.stats.errors += 1
                    self.stats.error_reasons.append(f"{msg.prompt_id}: {msg.reason}")
                    continue
                self.stats.received += 1
                if version - msg.weight_version > self.max_staleness:
                    self.stats.stale += 1
                    continue
                if self.dynamic_sampling and is_constant(msg):
                    self.stats.constant += 1
                    continue
                groups.append(msg)
        return _share(groups)

    def _recv(self):
        """The next message; while waiting, a worker this process started that died is an error."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                return self.receiver.recv(timeout=1.0)
            except TimeoutError:
                for worker in self.workers:
                    worker.poll()  # restarts a dead worker or raises WorkerDied with its log tail
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no rollout group for {self.timeout:.0f} s") from None

    def announce(self, update) -> None:
        if self.rank == 0:
            self.receiver.announce(update)

    def state(self) -> dict:
        return {"positions": self.receiver.positions() if self.rank == 0 else {}}

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.rank == 0:
            self.receiver.close()


class LocalSource:
    """Groups sampled in this process by `backend` from `samples` (data position = prompts drawn so far).

    Every rank samples the same groups (same seeds), so no broadcast is needed; on GPUs rank 0 alone
    would sample and share, here the tests and the colocated CPU run have one rank.
    """

    def __init__(self, backend, tokenizer, samples: list, *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, dynamic_sampling: bool = False, producer: str = "local",
                 render: Callable | None = None, score: Callable | None = None,
                 loop: asyncio.AbstractEventLoop | None = None):
        from medvl_engine.prompts import render_prompt
        from medvl_engine.rewards import score_samples
        from medvl_engine.rollout.types import SamplingParams

        if not samples:
            raise ValueError("LocalSource: no samples")
        self.backend = backend
        self.tokenizer = tokenizer
        self.samples = samples
        self.n = n
        self.params = dict(n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        self._params_type = SamplingParams
        self.seed = seed
        self.dynamic_sampling = dynamic_sampling
        self.producer = producer
        # MedVLThinker's prompt and format-gated reward unless a task brings its own (the toy task of the tests).
        self.render = render or render_prompt
        self.score = score or score_samples
        self.position = 0
        self.loop = loop or asyncio.new_event_loop()
        self.stats = SourceStats()

    def run(self, coroutine):
        return self.loop.run_until_complete(coroutine)

    def sample_at(self, position: int):
        epoch, offset = divmod(position, len(self.samples))
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.samples))
        return self.samples[order[offset]]

    def next(self, count: int, version: int) -> list[RolloutGroup]:
        groups: list[RolloutGroup] = []
        while len(groups) < count:
            need = count - len(groups)
            positions = list(range(self.position, self.position + need))
            self.position += need
            made = self.run(self._groups(positions))
            for group in made:
                self.stats.received += 1
                if self.dynamic_sampling and is_constant(group):
                    self.stats.constant += 1
                    continue
                groups.append(group)
        return groups

    async def _groups(self, positions: list[int]) -> list[RolloutGroup]:
        return await asyncio.gather(*(self._group(p) for p in positions))

    async def _group(self, position: int) -> RolloutGroup:
        from medvl_engine.rollout.types import PromptRequest

        sample = self.sample_at(position)
        text = self.render(self.tokenizer, sample)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        request = PromptRequest(prompt_id=f"{sample.dataset_name}:{sample.dataset_index}:{position}",
                                input_ids=ids, text=text, images=list(sample.images), sample=sample)
        # The seed is a function of the data position: a resumed run samples the same answers.
        params = self._params_type(**self.params, seed=self.seed * 1_000_003 + position)
        completions = await self.backend.generate(request, params)
        texts = [c.text for c in completions]
        scores = self.score(texts, [sample] * len(texts))
        return RolloutGroup.build(
            producer=self.producer, seq=position, prompt_id=request.prompt_id, dataset_name=sample.dataset_name,
            dataset_index=sample.dataset_index, weight_version=min(c.weight_version for c in completions),
            answer_label=sample.answer_label, prompt_ids=ids, response_ids=[c.token_ids for c in completions],
            logprobs=[c.logprobs for c in completions], texts=texts,
            finish_reasons=[c.finish_reason for c in completions], rewards=scores.reward,
            correct=scores.correct, format_ok=scores.format_ok, letters=list(scores.letter))

    def announce(self, update) -> None:
        pass

    def state(self) -> dict:
        return {"position": self.position}

    def restore(self, state: dict) -> None:
        self.position = int(state["position"])

    def close(self) -> None:
        self.run(self.backend.shutdown())
        self.loop.close()
