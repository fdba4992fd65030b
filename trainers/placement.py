"""Where GRPO's answers come from and where its weights go, for each placement: the builders of the
learner's source (a RolloutPool in this process, or rollout workers over ZeroMQ), the configuration of
each worker, and the weight sync that matches the placement. `grpo.run` calls `build_source` and
`make_weight_sync`; the feeds they build live in `sources.py`."""

from __future__ import annotations

from pathlib import Path

from medvl_engine import config as config_lib
from medvl_engine import run_folder
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
    # The learner assigns the shards: producer id rollout-K (its key's name on tcp) has shard K, and only those ids
    # get in, with their own positions.
    shards = {run_folder.rollout_worker_name(k): (k, t.num_shards) for k in range(t.num_shards)}
    receiver = GroupReceiver(t.endpoint, credits=t.credits or cfg.algo.prompts_per_step,
                             start_seqs=state["seqs"] if state else None, keys=t.keys or None, insecure=t.insecure,
                             shards=shards, max_message_bytes=max_message_bytes(cfg), strict=True)
    endpoint = receiver.endpoint.replace("0.0.0.0", "127.0.0.1")
    run_dir = Path(cfg.output)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The configuration of a worker started apart (another node): the run's data and rollout sections;
    # give it --connect, --producer-id, --shard-index and --num-shards on its command line.
    config_lib.save(worker_config(cfg, t.endpoint), run_dir / run_folder.ROLLOUT_WORKER_CONFIG)
    group = weight_group(cfg)
    workers = []
    for i in range(t.workers):
        path = config_lib.save(worker_config(cfg, endpoint, shard=i, group=group),
                               run_folder.rollout_config(run_dir, i))
        # A worker of a torch.distributed weight group cannot rejoin it: its death ends the run, with its log.
        workers.append(WorkerProcess(["--config", str(path)], log_path=run_folder.rollout_log(run_dir, i),
                                     name=run_folder.rollout_worker_name(i),
                                     max_restarts=0 if group else t.max_restarts))
    return TransportFeed(receiver, workers, weight_group=group, liveness_timeout_s=t.liveness_timeout_s)


# What one group may carry besides its token buffers: its prompt's images as raw pixels (5 images of
# 2048 x 2048 RGB), a decoded answer's characters per token (UTF-8 text of 4-character tokens is ~4-16 B).
IMAGE_BYTES_PER_GROUP = 64 << 20
TEXT_BYTES_PER_TOKEN = 16
MESSAGE_OVERHEAD = 1 << 20  # ids, labels, rewards, per-answer headers


def max_message_bytes(cfg: GRPOConfig) -> int:
    """The largest RolloutGroup the learner reads, from the run's settings (not the transport's 256 MiB): n answers
    of rollout.max_response_tokens (int32 id, float32 log-prob and text per token), a prompt of
    rollout.max_prompt_tokens, and its images. A worker turns a larger group into a RolloutError for its prompt.
    n=8 answers of 4096 tokens with 2048 prompt tokens: 65 MiB + 1.8 MiB."""
    rollout = cfg.rollout
    tokens = rollout.n * rollout.max_response_tokens * (4 + 4 + TEXT_BYTES_PER_TOKEN) + 4 * rollout.max_prompt_tokens
    return tokens + IMAGE_BYTES_PER_GROUP + MESSAGE_OVERHEAD


def weight_group(cfg: GRPOConfig) -> dict | None:
    """`transport.weight_sync distributed`: where the weight group meets (the learner's rank 0 hosts the
    rendezvous), its backend (`transport.sync_backend`) and the ranks of each worker's engine (an sglang
    engine: tp_size ranks; hf: one). None for the other syncs."""
    from medvl_engine.rollout.weight_group import group_name
    from medvl_engine.trainers.distributed import free_port

    t, rollout = cfg.transport, cfg.rollout
    if t.sync_kind != "distributed":
        return None
    port = t.sync_port or free_port()
    ranks = rollout.tp_size if rollout.backend == "sglang" else 1
    return {"address": t.sync_address, "port": port, "backend": t.sync_backend,
            "group_name": group_name(port), "engine_world_sizes": [ranks] * t.workers}


def worker_config(cfg: GRPOConfig, endpoint: str, *, shard: int = 0, group: dict | None = None):
    """The `medvl-engine rollout-worker` configuration of worker `shard` of this run (a worker started by
    hand takes the same file with its own --shard-index and --producer-id): the run's data and rollout
    sections, so it samples exactly what the colocated learner would; with a weight `group`
    (`weight_group`), where it meets and its rank there."""
    from medvl_engine.models import resolve_model_path
    from medvl_engine.rollout.worker import WorkerConfig

    return WorkerConfig(model=resolve_model_path(cfg.model.path), connect=endpoint,
                        producer_id=run_folder.rollout_worker_name(shard), shard_index=shard,
                        num_shards=cfg.transport.num_shards, data=cfg.data, rollout=cfg.rollout,
                        keys=cfg.transport.keys, insecure=cfg.transport.insecure, **_sync_fields(group, shard))


def _sync_fields(group: dict | None, shard: int) -> dict:
    if group is None:
        return {}
    sizes = group["engine_world_sizes"]
    return {"sync_address": group["address"], "sync_port": group["port"], "sync_rank": 1 + sum(sizes[:shard]),
            "sync_world_size": 1 + sum(sizes), "sync_backend": group["backend"]}


def make_weight_sync(cfg: GRPOConfig, source):
    from medvl_engine.trainers.weight_sync import make_sync

    feed = source.feed
    kind = cfg.transport.sync_kind
    if kind == "memory":
        backends = [feed.backend] if feed is not None else []
        return make_sync("memory", run_dir=cfg.output, backends=backends,
                         bucket_mb=cfg.transport.sync_bucket_mb, run=feed.run if feed is not None else None)
    if kind == "distributed":
        return _distributed_sync(cfg, source)
    return make_sync(kind, run_dir=cfg.output, announce=source.announce,
                     bucket_mb=cfg.transport.sync_bucket_mb)


def _distributed_sync(cfg: GRPOConfig, source):
    """A DistributedSync to the workers this learner started: rank 0 forms the weight group with them (it
    waits until each has loaded its engine and joined, raising if one dies meanwhile); every push is
    announced with its buckets, and waits for every worker to say it loaded them."""
    from medvl_engine.errors import ConfigError
    from medvl_engine.trainers.weight_sync import make_sync

    feed = source.feed  # rank 0 only
    group = getattr(feed, "weight_group", None)
    if feed is not None and group is None:
        raise ConfigError("transport.weight_sync=distributed needs rollout workers started by this learner "
                          "(a TransportFeed with a weight group)")
    sync = make_sync("distributed", run_dir=cfg.output, announce=source.announce,
                     bucket_mb=cfg.transport.sync_bucket_mb, wait=feed.wait_for_workers if feed else None,
                     backend=group["backend"] if group else "gloo",
                     group_name=group["group_name"] if group else "medvl_weights")
    if group is not None:
        sync.connect(source, group["address"], group["port"], group["engine_world_sizes"], check=feed.check)
    return sync
