"""Where a GRPO step's groups come from: one ordered source over the rollout stream, whatever the placement.

    source = OrderedSource(feed, rank=rank, prompts_per_step=256, max_staleness=1, dynamic_sampling=False)
    groups = source.next(256, version)      # RolloutGroups in stream-position order

The RolloutPool is the only producer. A feed hands the source the pool's output as wire messages:
- `LocalFeed`: a pool in this process over a backend sharing the machine with the learner (the
  colocated placement); it runs on the source's calls, so generation and training alternate.
- `TransportFeed`: the `GroupReceiver` that rollout worker processes stream into (the split
  placement), and the workers this process started.

`OrderedSource` consumes stream positions 0, 1, 2, ... in order, whichever worker made them and
whenever they arrived (a reorder buffer), so a run trains on the same prompts in the same order with
the same sample seeds in every placement. It opens the positions a step will consume (the window,
announced with the weights: `max_staleness` steps ahead, none at 0), and it is the one place that
drops a group: a RolloutError (counted, with its reason), a group more than `max_staleness` versions
behind, and with dynamic sampling a group whose rewards are all equal (`is_constant`); each drop opens
one more position. Its state (the next position and each producer's sequence number) goes into the
checkpoint, so a resumed run continues the stream exactly where it stood.

A step draws at most `max_draw_factor` times the groups it needs: when every group is dropped (a
model whose answers to every question score the same, every prompt failing) the run stops with a
`UserError` that counts what was dropped and why, instead of drawing forever without a word.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from medvl_engine.errors import UserError
from medvl_engine.rollout.groups import FailedPrompt, failed_message, is_constant, to_message
from medvl_engine.rollout.pool import RolloutPool
from medvl_engine.transport.admission import _is_log_count
from medvl_engine.transport.messages import RolloutError, RolloutGroup, WeightVersion

log = logging.getLogger(__name__)


@dataclass
class SourceStats:
    received: int = 0
    stale: int = 0
    constant: int = 0
    errors: int = 0
    duplicates: int = 0
    invalid: int = 0  # messages without a stream position, dropped
    error_reasons: list[str] = field(default_factory=list)


def _share(groups: list | None, error: str | None = None) -> list:
    """Rank 0's groups on every rank (one broadcast of the encoded messages), or rank 0's `error` raised on
    every rank (the others would otherwise wait for groups that never come)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        if error is not None:
            raise UserError(error)
        return groups
    from medvl_engine.transport.messages import decode, encode

    payload = [error if error is not None else [encode(g) for g in groups] if groups is not None else None]
    dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], str):
        raise UserError(payload[0])
    return [decode(b) for b in payload[0]]


class LocalFeed:
    """A RolloutPool in this process: its groups as wire messages, advanced only while the learner waits for them."""

    producer = "local"

    def __init__(self, backend, stream, rollout, *, score=None):
        self.backend = backend
        self.loop = asyncio.new_event_loop()
        self.pool = None
        self._make_pool = lambda start: RolloutPool.from_config([backend], stream.requests(start), rollout,
                                                                logprobs=True, score=score)
        self._items = None
        self.seek(0)

    def seek(self, position: int) -> None:
        """Start the stream at `position` (a resumed run); only before the first group is taken."""
        if self._items is not None:
            raise RuntimeError("LocalFeed.seek after the stream started")
        self.pool = self._make_pool(position)

    def run(self, coroutine):
        """Run `coroutine` on the pool's loop (weight pushes into the backend)."""
        return self.loop.run_until_complete(coroutine)

    def recv(self, timeout: float | None = None):
        if self._items is None:
            self._items = self.pool.stream()
        try:
            item = self.run(self._items.__anext__())
        except StopAsyncIteration:
            raise RuntimeError("the colocated prompt stream ended") from None
        seq = item.request.position
        if isinstance(item, FailedPrompt):
            return failed_message(item, self.producer, seq)
        return to_message(item, producer=self.producer, seq=seq)

    def announce(self, update: WeightVersion) -> None:
        self.pool.set_consumer_version(update.version)
        if update.window >= 0:
            self.pool.set_window(update.window)

    def check(self) -> None:
        pass

    def release_memory(self) -> None:
        """The engine's accelerator memory goes to the learner's update (SGLang: weights and KV cache
        released; the hf backend moves its model to the CPU; on a CPU nothing moves)."""
        self.run(self.backend.pause())
        self.run(self.backend.release_memory())

    def resume_memory(self) -> None:
        """Back before the weight push (the engine loads the new weights into this memory)."""
        self.run(self.backend.resume_memory())
        self.run(self.backend.resume())

    def close(self) -> None:
        if self._items is not None:
            self.run(self._items.aclose())
        self.run(self.backend.shutdown())
        self.loop.close()


class TransportFeed:
    """Rollout workers' groups over ZeroMQ (`GroupReceiver`), and the worker processes this learner started."""

    def __init__(self, receiver, workers: list | None = None, *, producers: list[str] | None = None,
                 weight_group: dict | None = None, liveness_timeout_s: float = 60.0):
        self.receiver = receiver
        self.workers = list(workers or [])
        self.liveness_timeout_s = liveness_timeout_s
        self.liveness_kills = 0
        # The workers' producer ids (a weight push over torch.distributed waits for each of them).
        self.producers = list(producers) if producers is not None else [w.name for w in self.workers]
        # transport.weight_sync distributed: where the workers' torch.distributed weight group meets
        # (address, port, backend, group_name, engine_world_sizes), as their configuration files say.
        self.weight_group = weight_group

    def start_workers(self) -> None:
        for worker in self.workers:
            worker.start()

    def recv(self, timeout: float | None = None):
        return self.receiver.recv(timeout=timeout)

    def announce(self, update: WeightVersion) -> None:
        self.receiver.announce(update)

    def wait_for_workers(self, version: int | None = None, timeout: float = 1800.0) -> None:
        """Until every worker has said Hello (`version` None: it has the latest announcement) or reported
        weights `version` loaded; a worker that died meanwhile raises (`check`), as does `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.receiver.wait_for(self.producers, version, timeout=1.0)
                return
            except TimeoutError:
                self.check()
                if time.monotonic() > deadline:
                    raise

    def seek(self, position: int) -> None:
        pass  # workers resume from the sequence numbers the receiver was started with

    def check(self) -> None:
        """Watch the workers this learner started: a dead one is restarted (or the run stops with its log tail,
        `WorkerDied`, past its restarts); a live one whose heartbeats stopped for `liveness_timeout_s` after it
        said Hello (a stopped or hung process) is killed, and restarted at the next look. A restart regenerates
        its positions from where the learner stands, with the same seeds."""
        if not self.workers:
            return
        self.receiver.read_queued()  # heartbeats that waited while the learner trained
        now = time.monotonic()
        for worker in self.workers:
            if worker.poll() is not None:
                continue
            seen = self.receiver.last_seen(worker.name)
            if seen > worker.started and now - seen > self.liveness_timeout_s:
                self.liveness_kills += 1
                log.warning("%s (pid %s) sent nothing for %.0f s (transport.liveness_timeout_s %g): killing it for a "
                            "restart", worker.name, worker.pid, now - seen, self.liveness_timeout_s)
                worker.kill()
                worker.poll()

    def release_memory(self) -> None:
        pass  # the workers' engines have accelerators of their own

    def resume_memory(self) -> None:
        pass

    def close(self, reason: str = "") -> None:
        # The Stop first: every worker, started here or by hand, exits by itself; then ours are made sure of.
        self.receiver.close(reason)
        for worker in self.workers:
            worker.stop()


class OrderedSource:
    """Groups in stream-position order from a feed (only rank 0 holds one); see the module docstring."""

    def __init__(self, feed, *, rank: int, prompts_per_step: int, max_staleness: int, dynamic_sampling: bool,
                 state: dict | None = None, timeout: float = 600.0, max_draw_factor: int = 8):
        if max_draw_factor < 1:
            raise ValueError(f"OrderedSource: max_draw_factor must be >= 1, got {max_draw_factor}")
        self.feed = feed
        self.max_draw_factor = max_draw_factor
        self.rank = rank
        self.prompts_per_step = prompts_per_step
        self.max_staleness = max_staleness
        self.dynamic_sampling = dynamic_sampling
        self.timeout = timeout
        self.stats = SourceStats()
        state = state or {}
        self.position = int(state.get("position", 0))
        self.seqs: dict[str, int] = dict(state.get("seqs", {}))
        self._announced = WeightVersion(version=0, path="", window=self.position)
        self._buffer: dict[int, RolloutGroup | RolloutError] = {}
        self._generated: list[tuple[str, float, float]] = []  # (producer, started, finished) since the last take
        if rank == 0:
            self.feed.seek(self.position)
            # Before any worker says Hello: a worker is told the window with its first Credit.
            self.feed.announce(self._announced)

    def next(self, count: int, version: int) -> list[RolloutGroup]:
        groups = None
        if self.rank == 0:
            groups = []
            before = (self.stats.constant, self.stats.stale, self.stats.errors)
            drawn, limit = 0, self.max_draw_factor * count
            while len(groups) < count:
                if drawn >= limit:
                    return _share(None, self._draw_limit_message(count, len(groups), drawn, before))
                drawn += 1
                self._open(version, count - len(groups))
                msg = self._take(self.position)
                self.position += 1
                self.seqs[msg.producer] = msg.seq + 1
                if isinstance(msg, RolloutGroup) and msg.finished:
                    self._generated.append((msg.producer, msg.started, msg.finished))
                if isinstance(msg, RolloutError):
                    self.stats.errors += 1
                    self.stats.error_reasons.append(f"{msg.prompt_id}: {msg.reason}")
                    continue
                self.stats.received += 1
                if version - msg.weight_version > self.max_staleness:
                    self.stats.stale += 1
                    continue
                if self.dynamic_sampling and is_constant(msg.reward_array()):
                    self.stats.constant += 1
                    continue
                groups.append(msg)
        return _share(groups)

    def _draw_limit_message(self, count: int, kept: int, drawn: int, before: tuple[int, int, int]) -> str:
        constant, stale, errors = (now - then for now, then in
                                   zip((self.stats.constant, self.stats.stale, self.stats.errors), before))
        reasons = [f"{constant} had answers that all scored the same (dynamic sampling)" if constant else "",
                   f"{stale} came from weights too old (rollout.max_staleness)" if stale else "",
                   f"{errors} failed (last: {self.stats.error_reasons[-1]})" if errors else ""]
        why = "; ".join(r for r in reasons if r)
        hint = (" The model answers every question alike (all right or all wrong): give it harder or easier "
                "questions, more answers per question (rollout.n), or turn rollout.dynamic_sampling off."
                if constant >= max(stale, errors) else "")
        return (f"stopped: a step needs {count} groups and drew {drawn} prompts (algo.max_draw_factor "
                f"{self.max_draw_factor} x {count}), stream positions {self.position - drawn}..{self.position - 1}, "
                f"but kept {kept}: {why}.{hint}")

    @property
    def window(self) -> int:
        """The first stream position the producers may not start yet (the last one announced)."""
        return self._announced.window

    def _open(self, version: int, remaining: int) -> None:
        """Let the producers start every position this step still needs, plus `max_staleness` steps ahead."""
        window = self.position + remaining + self.max_staleness * self.prompts_per_step
        if window > self.window or version > self._announced.version:
            self._send(WeightVersion(version=max(version, self._announced.version), path=self._announced.path,
                                     window=max(self.window, window)))

    def _take(self, position: int) -> RolloutGroup | RolloutError:
        deadline = time.monotonic() + self.timeout
        checked = time.monotonic()
        while position not in self._buffer:
            if time.monotonic() - checked >= 1.0:
                # The workers are watched every second even while others keep the socket busy.
                checked = time.monotonic()
                self.feed.check()
            try:
                msg = self.feed.recv(timeout=1.0)
            except TimeoutError:
                checked = time.monotonic()
                self.feed.check()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no rollout group for stream position {position} in {self.timeout:.0f} s") \
                        from None
                continue
            if msg.position < 0:  # a strict GroupReceiver refuses these; a message never stops the run
                self.stats.invalid += 1
                if _is_log_count(self.stats.invalid):
                    log.warning("dropped %s %r of producer %r: no stream position (a rollout worker of an older "
                                "version?) (%d so far)", type(msg).__name__, msg.prompt_id[:80], msg.producer,
                                self.stats.invalid)
                continue
            if msg.position < position or msg.position in self._buffer:
                self.stats.duplicates += 1
                continue
            self._buffer[msg.position] = msg
            deadline = time.monotonic() + self.timeout
        return self._buffer.pop(position)

    def take_generation_spans(self) -> list[tuple[str, float, float]]:
        """`(producer, started, finished)` (wall clock) of every group drawn since the last call, kept or
        dropped, for the run's timeline (on rank 0; empty elsewhere)."""
        spans, self._generated = self._generated, []
        return spans

    def announce(self, update: WeightVersion) -> None:
        """New weights (from the weight sync): passed on with the current window."""
        if self.rank == 0:
            # The buckets of a torch.distributed push go along; window updates later carry none.
            self._send(WeightVersion(version=update.version, path=update.path, window=self.window,
                                     buckets=update.buckets))

    def _send(self, update: WeightVersion) -> None:
        self._announced = update
        self.feed.announce(update)

    def state(self) -> dict:
        return {"position": self.position, "seqs": dict(self.seqs)}

    def release_memory(self) -> None:
        if self.rank == 0:
            self.feed.release_memory()

    def resume_memory(self) -> None:
        if self.rank == 0:
            self.feed.resume_memory()

    def stats_row(self) -> dict:
        """What the source dropped so far (on rank 0; zeros elsewhere), for the metrics."""
        return {"stream_position": self.position, "dropped_stale": self.stats.stale,
                "dropped_constant": self.stats.constant, "rollout_errors": self.stats.errors}

    def close(self) -> None:
        if self.rank == 0:
            self.feed.close()
