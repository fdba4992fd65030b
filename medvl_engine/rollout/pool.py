"""RolloutPool: keeps every backend busy with GRPO groups and streams them back scored, as they finish.

    pool = RolloutPool(backends, requests, SamplingParams(n=8, temperature=1.0), max_in_flight=32)
    async for item in pool.stream(limit=256):
        if isinstance(item, FailedPrompt): log(item)           # reported, never silently dropped
        else: sink(to_message(item, producer="w0", seq=...))  # a ScoredGroup; medvl_engine.rollout.groups

Scheduling: a prompt (one group of `n` answers) goes to the least-loaded backend that has a free
slot (`max_in_flight` groups per backend); a group is scored and yielded the moment its `n` answers
are in, whatever else is still running. Scoring uses `medvl_engine.rewards.score_samples` on the
group's `n` texts (one native call; a group of 8 takes microseconds, so it runs on the loop).

Off-policy bound (`max_staleness=k`): a group's version is the weight version of the backend that
starts it. The pool starts no group while the oldest unconsumed group — those in flight, plus the one
it would start now — would be more than k versions behind the consumer's version
(`set_consumer_version(v)`, the learner's step); in-flight groups still finish and are yielded.

Failures: a backend call that raises or exceeds `timeout_s` is retried (on another backend when one
is free) up to `retries` times; then the prompt comes out of the stream as a `FailedPrompt` with every
attempt's reason. A prompt is scored once, after its one successful attempt. A prompt whose image
cannot be decoded never reaches a backend (where it would fail its whole batch on every retry): it
comes out at once as a `FailedPrompt` with no attempts.

Images: each request's images are decoded once, off the loop, into copies of its own in the processor's
RGB (`decode_images`), before any backend sees them; the backend and the group's wire message (so the
learner) get those same pixels, and the dataset's shared, lazily decoded images are never loaded.

Dynamic sampling (dropping groups whose rewards are all equal) is the consumer's: a learner consuming an
ordered stream filters them itself, with `medvl_engine.rollout.groups.is_constant`, so that dropped positions
are still accounted for.

Window (`set_window(end)`): requests whose stream `position` is `end` or more are not started until
the consumer raises the window. A learner opens exactly the positions its step will consume, so no
answer is generated that would be too stale to train on (and none is thrown away).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from medvl_engine.profiling import stage
from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.groups import FailedPrompt, ScoredGroup
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams

# How often a pool blocked only by the staleness bound re-reads the backends' weight versions
# (backends do not announce updates to the pool): 20 ms is noise next to a weight update.
_STALENESS_POLL_S = 0.02


@dataclass
class PoolStats:
    prompts_started: int = 0
    groups_emitted: int = 0
    failed: int = 0
    retried_attempts: int = 0
    tokens_generated: int = 0
    staleness_waits: int = 0
    started_at: float = field(default_factory=time.perf_counter)

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started_at

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_generated / max(self.elapsed_s, 1e-9)


class RolloutPool:
    """Drives `backends` with the prompts of `requests`; see the module docstring for the contract."""

    def __init__(
        self,
        backends: Sequence[Backend],
        requests: Iterable[PromptRequest],
        params: SamplingParams,
        *,
        max_in_flight: int = 8,
        max_staleness: int | None = None,
        retries: int = 2,
        timeout_s: float | None = None,
        score_mode: str = "reward",
        score: Callable | None = None,
    ):
        from medvl_engine.rewards import check_mode

        if not backends:
            raise ValueError("RolloutPool: no backends given")
        if max_in_flight < 1:
            raise ValueError(f"RolloutPool: max_in_flight must be >= 1, got {max_in_flight}")
        if retries < 0:
            raise ValueError(f"RolloutPool: retries must be >= 0, got {retries}")
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"RolloutPool: timeout_s must be > 0 or None, got {timeout_s}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"RolloutPool: max_staleness must be >= 0 or None, got {max_staleness}")
        check_mode(score_mode)
        self.backends = list(backends)
        self.params = params
        self.max_in_flight = max_in_flight
        self.max_staleness = max_staleness
        self.retries = retries
        self.timeout_s = timeout_s
        self.score_mode = score_mode
        # A task's own reward (`score(texts, samples) -> ScoreResult`); default: MedVLThinker's parser.
        self.score = score
        self.stats = PoolStats()
        self._requests: Iterator[PromptRequest] = iter(requests)
        self._next: PromptRequest | None = None  # pulled from `requests`, held back by the window
        self._window: int | None = None
        self._exhausted = False
        self._load = [0] * len(self.backends)
        self._in_flight_versions: dict[asyncio.Task, int] = {}
        self._consumer_version = 0
        self._streaming = False
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, backends: Sequence[Backend], requests: Iterable[PromptRequest], rollout, *,
                    logprobs: bool, **kwargs) -> RolloutPool:
        """A pool with the sampling and the bounds of `rollout` (a RolloutConfig); `kwargs`: score_mode, score.

        Dynamic sampling stays with the consumer of an ordered stream (the learner), not the pool."""
        return cls(backends, requests, rollout.sampling_params(logprobs=logprobs), max_in_flight=rollout.max_in_flight,
                   max_staleness=rollout.max_staleness, retries=rollout.retries, timeout_s=rollout.timeout_s or None,
                   **kwargs)

    # -- consumer side ------------------------------------------------------------------------------

    @property
    def consumer_version(self) -> int:
        return self._consumer_version

    def set_consumer_version(self, version: int) -> None:
        """The learner's current policy version (callable from any thread); drives the staleness bound."""
        with self._lock:
            self._consumer_version = max(self._consumer_version, int(version))
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    def set_window(self, end: int | None) -> None:
        """Start only requests whose stream position is below `end` (None: no window); callable from any thread."""
        with self._lock:
            self._window = None if end is None else int(end)
        if self._loop is not None and self._wakeup is not None:
            self._loop.call_soon_threadsafe(self._wakeup.set)

    async def stream(self, limit: int | None = None) -> AsyncIterator[ScoredGroup | FailedPrompt]:
        """Yield scored groups (at most `limit` of them) and failed prompts until done.

        Ends when `limit` groups were yielded or the prompts ran out and everything in flight finished.
        Stopping the iteration early cancels the groups still in flight (their prompts are not yielded).
        """
        if limit is not None and limit < 0:
            raise ValueError(f"RolloutPool.stream: limit must be >= 0 or None, got {limit}")
        if self._streaming:
            raise RuntimeError("RolloutPool.stream: already streaming (one consumer per pool)")
        self._streaming = True
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self.stats.started_at = time.perf_counter()
        emitted = 0
        tasks: set[asyncio.Task] = set()
        try:
            while limit is None or emitted < limit:
                self._start_groups(tasks, None if limit is None else limit - emitted)
                if not tasks:
                    if self._exhausted and self._next is None:
                        return
                    # Only the staleness bound holds us: wait for a new consumer or backend version.
                    self.stats.staleness_waits += 1
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), _STALENESS_POLL_S)
                    except TimeoutError:
                        pass
                    continue
                waiter = asyncio.ensure_future(self._wakeup.wait())
                done, _ = await asyncio.wait(tasks | {waiter}, return_when=asyncio.FIRST_COMPLETED,
                                             timeout=_STALENESS_POLL_S if self._gated() else None)
                waiter.cancel()
                self._wakeup.clear()
                for task in done - {waiter}:
                    tasks.discard(task)
                    self._in_flight_versions.pop(task, None)
                    item = task.result()
                    if isinstance(item, FailedPrompt):
                        self.stats.failed += 1
                        yield item
                        continue
                    self.stats.groups_emitted += 1
                    emitted += 1
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            # A task cancelled before its first step never released its reserved slot.
            self._load = [0] * len(self.backends)
            self._in_flight_versions.clear()
            self._streaming = False

    # -- scheduling ---------------------------------------------------------------------------------

    def _start_groups(self, tasks: set[asyncio.Task], wanted: int | None) -> None:
        """Start prompts while a backend has a free slot, prompts remain, and the bounds allow."""
        while not self._exhausted and (wanted is None or len(tasks) < wanted):
            index = self._pick_backend(exclude=())
            if index is None or not self._fresh_enough(self.backends[index].weight_version):
                return
            request = self._peek()
            if request is None or not self._in_window(request):
                return
            self._next = None
            self.stats.prompts_started += 1
            self._load[index] += 1  # reserved now: the task only starts running at the next await
            task = asyncio.ensure_future(self._run_group(request, index))
            self._in_flight_versions[task] = self.backends[index].weight_version
            tasks.add(task)

    def _peek(self) -> PromptRequest | None:
        if self._next is None and not self._exhausted:
            try:
                self._next = next(self._requests)
            except StopIteration:
                self._exhausted = True
        return self._next

    def _in_window(self, request: PromptRequest) -> bool:
        window = self._window
        return window is None or request.position < window

    def _pick_backend(self, exclude: Iterable[int]) -> int | None:
        """Least-loaded backend with a free slot, preferring those not in `exclude` (they failed this prompt)."""
        free = [i for i in range(len(self.backends)) if self._load[i] < self.max_in_flight]
        if not free:
            return None
        excluded = set(exclude)
        return min(free, key=lambda i: (i in excluded, self._load[i], i))

    def _fresh_enough(self, new_version: int) -> bool:
        if self.max_staleness is None:
            return True
        oldest = min([new_version, *self._in_flight_versions.values()])
        return self._consumer_version - oldest <= self.max_staleness

    def _gated(self) -> bool:
        """A backend is free and a prompt waits, but the staleness bound or the window holds it back."""
        index = self._pick_backend(exclude=())
        if index is None or (self._exhausted and self._next is None):
            return False
        if not self._fresh_enough(self.backends[index].weight_version):
            return True
        return self._next is not None and not self._in_window(self._next)

    async def _run_group(self, request: PromptRequest, index: int) -> ScoredGroup | FailedPrompt:
        """Generate with retries, holding one backend slot per attempt, then score once.

        The first attempt's slot on backend `index` was reserved by the caller.
        """
        if request.sample is None:
            self._load[index] -= 1
            return FailedPrompt(request, "no sample to score the answers against", attempts=0,
                                errors=("PromptRequest.sample is None",))
        if request.images:
            # A broken image fails every attempt and, on a batching backend, every prompt of its batch:
            # decode here (off the loop; PIL releases the GIL) so it fails alone, once, with its name.
            images, broken = await asyncio.get_running_loop().run_in_executor(None, decode_images, request)
            if broken:
                self._load[index] -= 1
                return FailedPrompt(request, broken, attempts=0, errors=(broken,))
            request.images = images
        errors: list[str] = []
        failed_on: list[int] = []
        for attempt in range(1, self.retries + 2):
            if attempt > 1:
                self.stats.retried_attempts += 1
                index = self._pick_backend(exclude=failed_on)
                # This prompt's own slot was just released, so a free backend exists.
                assert index is not None
                self._load[index] += 1
            backend = self.backends[index]
            started = time.time()
            try:
                with stage("generate"):
                    completions = await asyncio.wait_for(backend.generate(request, self.params), self.timeout_s)
                if len(completions) != self.params.n:
                    raise RuntimeError(f"returned {len(completions)} completions, expected n={self.params.n}")
            except TimeoutError:
                errors.append(f"attempt {attempt} on backend {index} ({backend.name}): "
                              f"timed out after {self.timeout_s} s")
                failed_on.append(index)
                continue
            except Exception as exc:  # noqa: BLE001 - every backend failure is retried or reported
                errors.append(f"attempt {attempt} on backend {index} ({backend.name}): {type(exc).__name__}: {exc}")
                failed_on.append(index)
                continue
            finally:
                self._load[index] -= 1
            with stage("score"):
                group = self._score(request, completions, attempt)
            group.started, group.finished = started, time.time()
            return group
        return FailedPrompt(request, errors[-1], attempts=len(errors), errors=tuple(errors))

    def _score(self, request: PromptRequest, completions: list[Completion], attempts: int) -> ScoredGroup:
        from medvl_engine.rewards import score_samples

        texts, samples = [c.text for c in completions], [request.sample] * len(completions)
        if self.score is not None:
            result = self.score(texts, samples)
        else:
            # One group is a handful of rows: threads=1 scores them on this thread without a pool hand-off.
            result = score_samples(texts, samples, mode=self.score_mode, threads=1)
        self.stats.tokens_generated += sum(c.num_tokens for c in completions)
        return ScoredGroup(
            request=request, completions=completions, rewards=result.reward, correct=result.correct,
            format_ok=result.format_ok, letters=list(result.letter), parsed=list(result.parsed),
            weight_version=min(c.weight_version for c in completions), attempts=attempts,
        )


def decode_images(request: PromptRequest) -> tuple[list, str | None]:
    """The images of `request`, each decoded into a copy of its own in the processor's RGB
    (`medvl_engine.vision.decoded_copy`: the request's images are shared with every other position of
    its sample, and PIL cannot decode one image object from two threads), and why one cannot be decoded
    (naming the question and the image), or None."""
    from medvl_engine.vision import decoded_copy

    sample = request.sample
    where = f"{sample.dataset_name}[{sample.dataset_index}]" if sample is not None else request.prompt_id
    images = []
    for i, image in enumerate(request.images):
        try:
            images.append(decoded_copy(image))
        except (OSError, ValueError, SyntaxError) as exc:  # PIL raises all three for damaged files
            return [], f"question {where}: image {i} cannot be decoded ({exc}); the question is not generated"
    return images, None


def run_to_end(coroutine):
    """Run `coroutine` to the end from synchronous code, also inside a running event loop (a notebook):
    then on a thread of its own, since `asyncio.run` refuses to nest."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
