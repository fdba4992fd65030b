"""Where GRPO's answers come from and where its weights go, for each placement: the builders of the
learner's source (a RolloutPool in this process, or rollout workers over ZeroMQ), the configuration of
each worker, and the weight sync that matches the placement. `grpo.run` calls `build_source` and
`make_weight_sync`; the feeds they build live in `sources.py`."""

from __future__ import annotations

from pathlib import Path

from medvl_engine import config as config_lib
from medvl_engine.trainers.config import GRPOConfig


def build_source(cfg: GRPOConfig, learner, state: dict | None, feed=None):
    """The ordered source of this placement: a RolloutPool in this process (colocated), or the stream of
    rollout workers over ZeroMQ (rank 0 listens and starts `transport.workers` workers on this node).
    A given `feed` (a task of its own, e.g. the tests' toy task) replaces the configured one."""
    from medvl_engine.trainers.sources import OrderedSource, TransportFeed

    source_state = state["source"] if state else None
    if learner.rank == 0 and feed is None:
        if cfg.transport.colocated:
            feed = build_local_feed(cfg, learner, source_state)
        else:
            feed = build_transport_feed(cfg, source_state)
    source = OrderedSource(feed, rank=learner.rank, prompts_per_step=cfg.algo.prompts_per_step,
                           max_staleness=cfg.rollout.max_staleness, dynamic_sampling=cfg.rollout.dynamic_sampling,
                           state=source_state, max_draw_factor=cfg.algo.max_draw_factor)
    if isinstance(feed, TransportFeed):
        feed.start_workers()  # after the source announced its window: a worker's Hello is answered with it
    return source


def build_local_feed(cfg: GRPOConfig, learner, state: dict | None = None):
    """A RolloutPool over `rollout.backend` in this process, on the learner's device."""
    from medvl_engine.rollout.config import open_rollout
    from medvl_engine.rollout.stream import PromptStream, load_data
    from medvl_engine.trainers.sources import LocalFeed

    samples = load_data(cfg.data)
    backend, renderer, _ = open_rollout(cfg.rollout, cfg.model.path, samples, colocated=True,
                                        device=str(learner.device))
    stream = PromptStream.from_config(samples, renderer, cfg.data, cfg.rollout.seed,
                                      max_prompt_tokens=cfg.rollout.max_prompt_tokens)
    return LocalFeed(backend, stream, cfg.rollout)


def build_transport_feed(cfg: GRPOConfig, state: dict | None):
    from medvl_engine.rollout.launcher import WorkerProcess
    from medvl_engine.trainers.sources import TransportFeed
    from medvl_engine.transport.receiver import GroupReceiver

    t = cfg.transport
    receiver = GroupReceiver(t.endpoint, credits=t.credits or cfg.algo.prompts_per_step,
                             start_seqs=state["seqs"] if state else None, keys=t.keys or None)
    endpoint = receiver.endpoint.replace("0.0.0.0", "127.0.0.1")
    run_dir = Path(cfg.logging.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The configuration of a worker started apart (another node): the run's data and rollout sections;
    # give it --connect, --producer-id, --shard-index and --num-shards on its command line.
    config_lib.save(worker_config(cfg, t.endpoint), run_dir / "rollout-worker.yaml")
    workers = []
    for i in range(t.workers):
        path = config_lib.save(worker_config(cfg, endpoint, shard=i), run_dir / f"rollout-{i}.yaml")
        workers.append(WorkerProcess(["--config", str(path)], log_path=run_dir / f"rollout-{i}.log",
                                     name=f"rollout-{i}"))
    return TransportFeed(receiver, workers)


def worker_config(cfg: GRPOConfig, endpoint: str, *, shard: int = 0):
    """The `medvl-engine rollout-worker` configuration of worker `shard` of this run (a worker started by
    hand takes the same file with its own --shard-index and --producer-id): the run's data and rollout
    sections, so it samples exactly what the colocated learner would."""
    from medvl_engine.models import resolve_model_path
    from medvl_engine.rollout.worker import WorkerConfig

    return WorkerConfig(model=resolve_model_path(cfg.model.path), connect=endpoint, producer_id=f"rollout-{shard}",
                        shard_index=shard, num_shards=max(cfg.transport.workers, 1), data=cfg.data,
                        rollout=cfg.rollout, keys=cfg.transport.keys)


def make_weight_sync(cfg: GRPOConfig, source):
    from medvl_engine.trainers.weight_sync import make_sync

    feed = source.feed
    kind = cfg.transport.sync_kind
    if kind == "memory":
        backends = [feed.backend] if feed is not None else []
        return make_sync("memory", run_dir=cfg.logging.run_dir, backends=backends,
                         bucket_mb=cfg.transport.sync_bucket_mb, run=feed.run if feed is not None else None)
    return make_sync(kind, run_dir=cfg.logging.run_dir, announce=source.announce,
                     bucket_mb=cfg.transport.sync_bucket_mb)
