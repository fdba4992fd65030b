"""`medvl-engine rollout-worker`: one process that turns a prompt stream into scored GRPO groups for a learner.

    medvl-engine rollout-worker --model ./policy --connect tcp://learner:5555 --data.source D \
        --producer-id rollout-0 --shard-index 0 --num-shards 2 --rollout.n 8
    medvl-engine rollout-worker --config runs/x/rollout-0.yaml     # what a learner writes for its workers

Its flags are those of `WorkerConfig`, the same `data` and `rollout` sections as `medvl-engine grpo`:
a learner hands its workers their configuration as a file, so a worker samples exactly what the
colocated learner would. It runs a RolloutPool over one backend (data-parallel replicas are separate
worker processes, each a shard of one PromptStream) and sends every group to the learner with
`medvl_engine.transport.sender.GroupSender`, waiting for credit when the learner is behind.

Positions: worker i of W answers the stream positions k = i mod W (`PromptStream`); its group (or
its RolloutError) for position k goes out with sequence number (k - i) / W, in order (groups that
finish out of order wait in a reorder buffer). A restarted worker asks the learner for its sequence
number (`handshake`) and continues from there: nothing is lost or sent twice. The worker does not drop
constant-reward groups: the learner sees every position, in order, and filters them itself.

The learner's `WeightVersion` announcements drive the worker: a version with a path loads those weights
from disk; a version with buckets is received over the torch.distributed weight group the worker joined at
start (`sync_address`, written by a learner with `transport.weight_sync distributed`), bucket by bucket
(`Backend.update_weights_from_distributed`), and answered with `WeightsLoaded`; the version is the
pool's consumer version (the staleness bound); `window` is the first stream position the learner does
not consume yet, and the pool starts no position beyond it.

Seeds: position k samples with `derive_seed(rollout.seed, k)`, whoever generates it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

from medvl_engine.config import param
from medvl_engine.errors import ConfigError
from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.config import DataConfig, RolloutConfig
from medvl_engine.rollout.groups import FailedPrompt, failed_message, to_message
from medvl_engine.rollout.pool import RolloutPool
from medvl_engine.rollout.stream import PromptStream
from medvl_engine.transport.messages import RolloutError

logger = logging.getLogger(__name__)

# How often the worker looks for weight announcements while it waits for groups: a weight load
# takes seconds, so 50 ms of latency is invisible.
_WEIGHT_POLL_S = 0.05
# How long a worker waits, after the handshake, for the learner's first announcement (its window):
# the learner sends it right after the Credit that answers the Hello, so it is normally already here.
_FIRST_ANNOUNCEMENT_S = 1.0


@dataclass
class WorkerConfig:
    """A rollout worker: its share of the prompt stream of `data`, answered as `rollout` says, sent to `connect`."""

    model: str = param("", "model folder (Hugging Face layout) or `smollm2` for the embedded default")
    connect: str = param("", "the learner's endpoint, e.g. tcp://host:5555 or ipc:///tmp/medvl.sock")
    producer_id: str = param("rollout-0", "this worker's stream name; keep it across restarts")
    shard_index: int = param(0, "this worker's share of the prompt stream (positions k = shard_index mod num_shards)")
    num_shards: int = param(1, "data-parallel workers splitting the prompt stream")
    max_prompts: int = param(0, "stop before this stream position (0: cycle over the data until stopped)")
    handshake_timeout_s: float = param(600.0, "how long to wait for the learner to answer")
    keys: str = param("", "folder of the run's CURVE keys for tcp (empty: $MEDVL_TRANSPORT_KEYS); the worker uses "
                      "the pair named for its producer id")
    insecure: bool = param(False, "UNSAFE: tcp without CURVE keys, as the learner's transport.insecure (any process "
                           "that reaches the port can speak for any worker)")
    heartbeat_s: float = param(2.0, "how often the worker tells the learner it runs (a learner that started it "
                               "restarts it when these stop for transport.liveness_timeout_s)")
    learner_timeout_s: float = param(60.0, "exit when the connection to the learner has been down this long (the "
                                     "learner exited or died); a learner that finishes says so and the worker exits "
                                     "at once")
    on_engine_failure: Literal["restart", "report"] = param(
        "restart", "a prompt the engine fails after rollout.retries: restart: the worker exits unsent, and its restart "
        "regenerates the prompt with the same seed (a worker that keeps failing stops the run after the learner's "
        "transport.max_restarts); report: it goes to the learner as a failed prompt, whose position is skipped")
    sync_address: str = param("", "weights over torch.distributed (the learner's transport.weight_sync distributed): "
                              "the address of the learner's rank 0, where the weight group meets (empty: no group, "
                              "announced weights are loaded from disk)")
    sync_port: int = param(0, "the weight group's rendezvous port on the learner's rank 0")
    sync_rank: int = param(0, "this worker's first rank in the weight group (the learner is rank 0)")
    sync_world_size: int = param(0, "ranks in the weight group: the learner's rank 0 and every worker's engine ranks")
    sync_backend: str = param("gloo", "torch.distributed backend of the weight group: gloo (CPU) or nccl (GPU)")
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("model: is required (a model folder, or `smollm2`)")
        if not self.connect:
            raise ConfigError("connect: is required (the learner's endpoint)")
        if not self.producer_id:
            raise ConfigError("producer_id: may not be empty")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(f"shard_index: must be in [0, num_shards={self.num_shards}), got {self.shard_index}")
        if self.max_prompts < 0 or not self.handshake_timeout_s > 0:
            raise ConfigError("max_prompts must be >= 0 and handshake_timeout_s > 0")
        if not self.heartbeat_s > 0 or not self.learner_timeout_s > 0:
            raise ConfigError("heartbeat_s and learner_timeout_s must be > 0")
        self.rollout.require_sampling("a rollout worker samples GRPO groups, whose n answers would be equal")
        self.rollout.require_full_distribution("a rollout worker's answers are trained on")
        if self.sync_address:
            if not 0 < self.sync_port <= 65535:
                raise ConfigError(f"sync_port: the weight group needs a port in [1, 65535], got {self.sync_port}")
            if not 0 < self.sync_rank < self.sync_world_size:
                raise ConfigError(f"sync_rank: must be in [1, sync_world_size={self.sync_world_size}) (rank 0 is "
                                  f"the learner), got {self.sync_rank}")
            if self.sync_backend not in ("gloo", "nccl"):
                raise ConfigError(f"sync_backend: gloo or nccl, got {self.sync_backend!r}")

    @property
    def weight_group(self) -> dict | None:
        """The arguments of `Backend.init_weights_update_group` (None: no weight group)."""
        if not self.sync_address:
            return None
        from medvl_engine.rollout.weight_group import group_name

        return {"master_address": self.sync_address, "master_port": self.sync_port, "rank_offset": self.sync_rank,
                "world_size": self.sync_world_size, "group_name": group_name(self.sync_port),
                "backend": self.sync_backend}


def add_arguments(parser) -> None:
    from medvl_engine import config as config_lib

    config_lib.add_arguments(parser, WorkerConfig)


def main(args) -> int:
    from medvl_engine import config as config_lib

    cfg = config_lib.from_args(WorkerConfig, args)
    return run(cfg)


# Exit codes of a worker that did not finish its stream: a supervisor (the learner's WorkerProcess, SLURM,
# Kubernetes) restarts it on any but 0 and 2, and the new process resumes where the learner stands.
EXIT_SESSION_ENDED = 75  # the learner ended this session (a protocol violation): a new process regenerates
EXIT_ENGINE_FAILED = 70  # the engine failed a prompt (on_engine_failure restart)
EXIT_LEARNER_GONE = 69  # the connection to the learner was down for learner_timeout_s


class EngineFailed(RuntimeError):
    """The engine failed a prompt after its retries: this process exits with it unsent, a new one regenerates it."""


def run(cfg: WorkerConfig) -> int:
    from medvl_engine.rollout.config import open_rollout
    from medvl_engine.rollout.stream import load_data
    from medvl_engine.transport.sender import GroupSender, ReceiverGone, Stopped

    samples = load_data(cfg.data)
    backend, renderer, _ = open_rollout(cfg.rollout, cfg.model, samples)
    stream = PromptStream.from_config(samples, renderer, cfg.data, cfg.rollout.seed, shard=cfg.shard_index,
                                      num_shards=cfg.num_shards, stop=cfg.max_prompts or None,
                                      max_prompt_tokens=cfg.rollout.max_prompt_tokens)
    sender = GroupSender(cfg.connect, cfg.producer_id, keys=cfg.keys or None, insecure=cfg.insecure)
    worker = RolloutWorker(backend, sender, stream, cfg.rollout, handshake_timeout_s=cfg.handshake_timeout_s,
                           weight_group=cfg.weight_group, heartbeat_s=cfg.heartbeat_s,
                           learner_timeout_s=cfg.learner_timeout_s, on_engine_failure=cfg.on_engine_failure)
    code, linger = 0, 0.0
    try:
        sent = asyncio.run(worker.run())
        linger = None  # the end of its stream: the learner gets everything sent before the socket closes
        logger.info("%s: sent %d messages; %s", cfg.producer_id, sent, worker.stats)
    except Stopped as exc:
        if exc.kind == "finished":
            logger.info("%s: %s; exiting", cfg.producer_id, exc.reason)
        else:
            logger.error("%s", exc)
            code = 2 if exc.kind == "unknown_producer" else EXIT_SESSION_ENDED
    except ReceiverGone as exc:
        logger.error("%s: %s; exiting", cfg.producer_id, exc)
        code = EXIT_LEARNER_GONE
    except EngineFailed as exc:
        logger.error("%s: %s; exiting for a restart", cfg.producer_id, exc)
        code = EXIT_ENGINE_FAILED
    finally:
        sender.close(linger_s=linger)
    return code


class RolloutWorker:
    """PromptStream -> RolloutPool -> reorder buffer -> GroupSender, with the learner's announcements applied."""

    def __init__(self, backend: Backend, sender, stream: PromptStream, rollout: RolloutConfig, *,
                 handshake_timeout_s: float | None = None, weight_group: dict | None = None,
                 heartbeat_s: float = 2.0, learner_timeout_s: float = 60.0, on_engine_failure: str = "report"):
        self.backend = backend
        self.sender = sender
        self.stream = stream
        self.rollout = rollout
        self.handshake_timeout_s = handshake_timeout_s
        self.stats = None
        self._window: int | None = None
        self.weight_group = weight_group  # init_weights_update_group's arguments, or None (weights from disk)
        self._load_lock = asyncio.Lock()  # one weight update at a time, in announcement order
        self.heartbeat_s = heartbeat_s
        self.learner_timeout_s = learner_timeout_s
        self.on_engine_failure = on_engine_failure

    def seq_of(self, position: int) -> int:
        return (position - self.stream.shard) // self.stream.num_shards

    async def run(self) -> int:
        """Generate and send until the stream stops (forever without a stop); returns messages sent."""
        if self.weight_group is not None:
            # Before the handshake: the learner forms the group right after starting its workers, and
            # answers Hellos only once every worker joined.
            group = self.weight_group
            logger.info("joining the weight group at %s:%d as rank %d of %d (%s)", group["master_address"],
                        group["master_port"], group["rank_offset"], group["world_size"], group["backend"])
            await self.backend.init_weights_update_group(**group)
        start_seq = self.sender.handshake(self.handshake_timeout_s)
        self._check_shard()
        update = self.sender.poll_weight_version(timeout=_FIRST_ANNOUNCEMENT_S)
        start = start_seq * self.stream.num_shards + self.stream.shard
        logger.info("%s: starting at sequence number %d (stream position %d)", self.sender.producer_id, start_seq,
                    start)
        pool = RolloutPool.from_config([self.backend], self.stream.requests(start), self.rollout, logprobs=True)
        self.stats = pool.stats
        await self._apply(pool, update)
        pump = asyncio.create_task(self._pump(pool, start_seq))
        watcher = asyncio.create_task(self._watch(pool))
        try:
            # The watcher ends only by raising (a Stop from the learner, the learner gone): whichever of the
            # two ends first ends the worker.
            done, _ = await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            return pump.result()
        finally:
            for task in (pump, watcher):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.backend.shutdown()

    def _check_shard(self) -> None:
        """The learner assigns the shards; a worker started with another one stops at once, saying both."""
        assigned = self.sender.shard
        mine = (self.stream.shard, self.stream.num_shards)
        if assigned is not None and assigned != mine:
            raise ConfigError(f"{self.sender.producer_id}: the learner assigns it shard {assigned[0]} of "
                              f"{assigned[1]}, but this worker was started with --shard-index {mine[0]} "
                              f"--num-shards {mine[1]}")

    async def _pump(self, pool: RolloutPool, start_seq: int) -> int:
        """Send the pool's groups in sequence order (a reorder buffer); returns how many were sent.

        A prompt the engine failed after its retries (not its data: those fail with no attempt) ends this
        process unsent with `on_engine_failure` restart (`EngineFailed`): a new process regenerates it from the
        same position and seed. Holding it back for a later success instead could wait for ever: at staleness 0
        a worker's share of a step may be the failed prompts alone."""
        ready: dict[int, object] = {}
        next_seq, sent = start_seq, 0
        async for item in pool.stream():
            if isinstance(item, FailedPrompt) and item.attempts > 0 and self.on_engine_failure == "restart":
                raise EngineFailed(f"the engine failed the prompt at stream position {item.request.position} "
                                   f"({item.request.prompt_id}) after {item.attempts} attempt(s): {item.reason}")
            ready[self.seq_of(item.request.position)] = item
            while next_seq in ready:
                await self._send(self._message(ready.pop(next_seq), next_seq), pool)
                next_seq += 1
                sent += 1
        if ready:
            raise RuntimeError(f"RolloutWorker: sequence numbers {sorted(ready)} finished but {next_seq} never did")
        return sent

    def _message(self, item, seq: int):
        producer = self.sender.producer_id
        if isinstance(item, FailedPrompt):
            logger.warning("prompt %s failed after %d attempts: %s", item.request.prompt_id, item.attempts, item.reason)
            return failed_message(item, producer, seq)
        return to_message(item, producer=producer, seq=seq)

    async def _send(self, message, pool: RolloutPool) -> None:
        # send() blocks while the learner has given no credit; short waits keep the loop (and the
        # weight watcher) running, and a timed-out send has sent nothing, so it is simply repeated.
        while True:
            try:
                self.sender.send(message, timeout=_WEIGHT_POLL_S)
                return
            except ValueError as exc:  # larger than the learner reads: the prompt fails, its position is kept
                logger.warning("prompt %s: %s", message.prompt_id, exc)
                message = RolloutError(producer=message.producer, seq=message.seq, prompt_id=message.prompt_id,
                                       reason=str(exc)[:4096], position=message.position)
            except TimeoutError:
                await self._apply(pool, self.sender.poll_weight_version())
                await asyncio.sleep(0)

    async def _watch(self, pool: RolloutPool) -> None:
        """Apply the learner's announcements as they come, tell it this process runs (`Heartbeat`), and raise
        when it ended this session (`Stopped`) or has been unreachable for `learner_timeout_s` (`ReceiverGone`)."""
        from medvl_engine.transport.sender import ReceiverGone

        beat = time.monotonic()
        while True:
            await self._apply(pool, self.sender.poll_weight_version())
            if time.monotonic() - beat >= self.heartbeat_s:
                beat = time.monotonic()
                self.sender.heartbeat()
                down = self.sender.receiver_down_s
                if down > self.learner_timeout_s:
                    raise ReceiverGone(f"the learner at {self.sender.endpoint} has been unreachable for {down:.0f} s "
                                       f"(it exited or died; learner_timeout_s {self.learner_timeout_s:g})")
            await asyncio.sleep(_WEIGHT_POLL_S)

    async def _apply(self, pool: RolloutPool, update) -> None:
        pool.set_consumer_version(self.sender.consumer_version)
        if update is None:
            return
        if update.window >= 0 and (self._window is None or update.window > self._window):
            self._window = update.window
            pool.set_window(update.window)
        if update.version <= self.backend.weight_version:
            return
        async with self._load_lock:
            # Another caller may have loaded this version (or a newer one) while this one waited.
            if update.version > self.backend.weight_version:
                await self._load(update)

    async def _load(self, update) -> None:
        if update.buckets:
            await self._receive(update)
            return
        if not update.path:
            logger.info("weights v%d announced without a path or buckets (nothing to load)", update.version)
            return
        logger.info("loading weights v%d from %s", update.version, update.path)
        await self.backend.update_weights_from_disk(update.path, update.version)

    async def _receive(self, update) -> None:
        """The learner's rank 0 broadcasts `update.buckets` over the weight group: the backend receives them
        bucket by bucket, paused (no batch runs on half-updated weights), then the learner is told."""
        if self.weight_group is None:
            raise RuntimeError(f"weights v{update.version} are broadcast over torch.distributed, but this worker "
                               "joined no weight group (its config has no sync_address)")
        logger.info("receiving weights v%d over torch.distributed (%d buckets)", update.version,
                    len(update.buckets))
        await self.backend.pause()
        try:
            for bucket in update.buckets:
                await self.backend.update_weights_from_distributed(bucket.names, bucket.dtypes, bucket.shapes,
                                                                   update.version, self.weight_group["group_name"])
        finally:
            await self.backend.resume()
        self.sender.report_loaded(update.version)
        logger.info("weights v%d received", update.version)


