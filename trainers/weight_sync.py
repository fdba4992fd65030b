"""Pushing new policy weights from the learner to the rollout backends, with a version number.

Three ways, one interface (`push(learner, version)`, collective over the learner's ranks):

- `MemorySync`: a backend in the learner's own process (the hf backend of a colocated run, tests):
  `update_weights_from_tensors`, bucket by bucket, no copy through disk.
- `DiskSync`: a Hugging Face folder per version under `run_dir/weights/`, then a `WeightVersion`
  announcement; each worker pauses, loads it (`update_weights_from_disk`), flushes its cache and
  continues. Works across processes and nodes that share a file system.
- `DistributedSync`: SGLang's path: the engines join a torch.distributed group with the learner's
  rank 0 (`init_weights_update_group`; NCCL on GPUs, gloo on the CPU); for every bucket the engines
  are told the names, dtypes and shapes (`update_weights_from_distributed`) while rank 0 broadcasts
  the tensors. Under ZeRO-3 every rank takes part in gathering a bucket, rank 0 alone broadcasts it.
  Engines in this process are called directly; rollout workers in their own processes
  (`transport.weight_sync distributed`) are told through the transport:

      learner rank 0                                   each rollout worker
      announce WeightVersion(v, buckets=[names, dtypes, shapes per bucket])
      wait until every worker said Hello (so it has the announcement)
                                                       pause its backend; per bucket:
      per bucket: broadcast its tensors, in order  ->    backend.update_weights_from_distributed(...)
                                                       resume; send WeightsLoaded(v)
      wait until every worker reported v loaded

  so at most one version is in flight and a step never starts before the workers run its weights.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from medvl_engine import run_folder
from medvl_engine.errors import ConfigError
from medvl_engine.profiling import stage
from medvl_engine.transport.messages import WeightBucket, WeightVersion


class MemorySync:
    """Same-process backend: tensors go straight into its model (`Backend.update_weights_from_tensors`)."""

    def __init__(self, backends: Iterable, *, bucket_bytes: int = 512 << 20, run: Callable | None = None):
        self.backends = list(backends)
        self.bucket_bytes = bucket_bytes
        self.run = run or asyncio.run

    def push(self, learner, version: int) -> dict:
        start = time.perf_counter()
        nbytes = 0
        tensors: list[tuple[str, torch.Tensor]] = []
        with stage("weight_sync/gather"):
            for bucket in learner.full_parameters(self.bucket_bytes):
                tensors.extend(bucket)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
        if learner.rank == 0:
            for backend in self.backends:
                with stage("weight_sync/load"):
                    self.run(_update_from_tensors(backend, tensors, version))
        return {"sync_seconds": time.perf_counter() - start, "sync_bytes": nbytes}


async def _update_from_tensors(backend, tensors, version: int) -> None:
    await backend.pause()
    try:
        await backend.update_weights_from_tensors(tensors, version)
    finally:
        await backend.resume()


class DiskSync:
    """A Hugging Face folder per version, announced to the workers (`announce(WeightVersion)`)."""

    def __init__(self, root: str | Path, announce: Callable[[WeightVersion], None] | None = None, *, keep: int = 2):
        self.root = Path(root)
        self.announce = announce
        self.keep = keep

    def path(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def push(self, learner, version: int) -> dict:
        from medvl_engine.trainers.checkpoint import export_hf

        start = time.perf_counter()
        target = self.path(version)
        partial = target.with_name(target.name + ".partial")
        with stage("weight_sync/export"):
            export_hf(learner, partial)
        nbytes = 0
        if learner.rank == 0:
            # A worker never sees a half-written folder: rename after the last file is written.
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)
            nbytes = sum(p.stat().st_size for p in target.glob("*.safetensors"))
            if self.announce:
                self.announce(WeightVersion(version=version, path=str(target)))
            # Workers may still be loading the previous version: keep `keep` folders, delete older ones.
            for old in sorted(self.root.glob("v*"))[: -self.keep]:
                if old.is_dir() and not old.name.endswith(".partial"):
                    shutil.rmtree(old, ignore_errors=True)
        return {"sync_seconds": time.perf_counter() - start, "sync_bytes": nbytes}


class DistributedSync:
    """Bucketed broadcast over a torch.distributed group to SGLang engines or rollout workers.

    `engines` are backends in this process (`Backend` objects or clients with the coroutines
    `init_weights_update_group` and `update_weights_from_distributed`). Rollout workers in other
    processes join the group themselves and learn each version's buckets from `announce` (a
    `WeightVersion` with `buckets`); `wait(None)` returns once every worker can hear the announcement,
    `wait(version)` once every worker reported `version` loaded. The engine ranks are 1..world_size-1
    of the group, the learner's rank 0 is its rank 0. Call `connect(...)` once on every learner rank,
    then `push` after every step.
    """

    def __init__(self, engines: Iterable = (), *, bucket_bytes: int = 512 << 20, group_name: str = "medvl_weights",
                 backend: str = "nccl", run: Callable | None = None,
                 announce: Callable[[WeightVersion], None] | None = None,
                 wait: Callable[[int | None], None] | None = None):
        self.engines = list(engines)
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.backend = backend
        self.run = run or asyncio.run
        self.announce = announce
        self.wait = wait
        self.group = None
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.engines)))

    def connect(self, learner, master_address: str, master_port: int, engine_world_sizes: list[int], *,
                check: Callable[[], None] | None = None) -> None:
        """Form the group: learner rank 0 is rank 0, engine i holds ranks offset_i .. offset_i + size_i - 1.

        Blocks until every rank joined. `check` is called every second meanwhile (it raises when a
        rollout worker that should join has died, instead of waiting out the group's timeout)."""
        if learner.rank != 0:
            return
        world_size = 1 + sum(engine_world_sizes)
        offsets = [1 + sum(engine_world_sizes[:i]) for i in range(len(engine_world_sizes))]
        futures = [self.pool.submit(self.run, engine.init_weights_update_group(
            master_address, master_port, offset, world_size, self.group_name, self.backend))
            for engine, offset in zip(self.engines, offsets)]
        init_method = f"tcp://{master_address}:{master_port}"
        if check is None:
            self.group = _init_custom_group(self.backend, init_method, world_size, 0, self.group_name)
        else:
            self.group = _init_watched(lambda: _init_custom_group(self.backend, init_method, world_size, 0,
                                                                  self.group_name), check)
        for f in futures:
            f.result()

    def push(self, learner, version: int) -> dict:
        import torch.distributed as dist

        if learner.rank == 0 and self.group is None:
            raise RuntimeError("DistributedSync.push before connect()")
        start = time.perf_counter()
        nbytes = 0
        plan = None
        if learner.rank == 0 and self.announce is not None:
            plan = bucket_plan(learner, self.bucket_bytes)
            self.announce(WeightVersion(version=version, buckets=plan))
            if self.wait is not None:
                with stage("weight_sync/wait"):
                    self.wait(None)  # every worker said Hello: it has the announcement, or gets it now
        on_cpu = self.backend == "gloo"
        for index, bucket in enumerate(learner.full_parameters(self.bucket_bytes)):
            if learner.rank != 0:
                continue  # other ranks only help gather ZeRO-3 shards
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            if plan is not None and (index >= len(plan) or plan[index].names != names
                                     or plan[index].shapes != shapes or plan[index].dtypes != dtypes):
                raise RuntimeError(f"DistributedSync: bucket {index} of version {version} is not the announced one")
            futures = [self.pool.submit(self.run, engine.update_weights_from_distributed(
                names, dtypes, shapes, version, self.group_name)) for engine in self.engines]
            with stage("weight_sync/broadcast"):
                for _, tensor in bucket:
                    dist.broadcast(tensor.contiguous().cpu() if on_cpu else tensor.contiguous(), src=0,
                                   group=self.group)
                    nbytes += tensor.numel() * tensor.element_size()
                for f in futures:
                    f.result()
        if learner.rank == 0 and self.wait is not None:
            with stage("weight_sync/wait"):
                self.wait(version)  # every worker runs `version` now
        return {"sync_seconds": time.perf_counter() - start, "sync_bytes": nbytes}


def bucket_plan(learner, bucket_bytes: int) -> list[WeightBucket]:
    """The buckets `learner.full_parameters(bucket_bytes)` will yield, from the parameters' metadata alone
    (no gathering): what a worker must know before the first tensor arrives. `push` checks each gathered
    bucket against it."""
    zero3 = learner.ds_cfg.zero_stage == 3
    buckets: list[WeightBucket] = []
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[list[int]] = []
    size = 0
    for name, param in learner.module.named_parameters():
        full = zero3 and hasattr(param, "ds_shape")
        numel = param.ds_numel if full else param.numel()
        nbytes = numel * param.element_size()
        if names and size + nbytes > bucket_bytes:
            buckets.append(WeightBucket(names=names, dtypes=dtypes, shapes=shapes))
            names, dtypes, shapes, size = [], [], [], 0
        names.append(name)
        dtypes.append(str(param.dtype).removeprefix("torch."))
        shapes.append(list(param.ds_shape if full else param.shape))
        size += nbytes
    if names:
        buckets.append(WeightBucket(names=names, dtypes=dtypes, shapes=shapes))
    return buckets


def _init_watched(init: Callable, check: Callable[[], None]):
    """`init()` in a daemon thread, calling `check()` every second until it returns (a `check` that raises
    leaves the thread blocked in the rendezvous; the process is on its way out then)."""
    import threading

    result: dict = {}

    def target():
        try:
            result["group"] = init()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            result["error"] = exc

    thread = threading.Thread(target=target, name="weight-group-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(1.0)
        if thread.is_alive():
            check()
    if "error" in result:
        raise result["error"]
    return result["group"]


def _init_custom_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str):
    """A second process group next to the default one (see `medvl_engine.rollout.weight_group`)."""
    from medvl_engine.rollout.weight_group import init_custom_group

    return init_custom_group(backend, init_method, world_size, rank, group_name)


def make_sync(kind: str, *, run_dir: str | Path, backends: Iterable = (), announce=None, bucket_mb: int = 512,
              run: Callable | None = None, wait: Callable[[int | None], None] | None = None,
              backend: str = "nccl", group_name: str = "medvl_weights"):
    """The sync for `transport.weight_sync`: memory (backends in this process), disk, distributed (a
    DistributedSync needs `connect(...)` with engines or workers that join its group; rollout workers in
    other processes learn the buckets through `announce` and report through `wait`, see DistributedSync)."""
    if kind == "memory":
        return MemorySync(backends, bucket_bytes=bucket_mb << 20, run=run)
    if kind == "disk":
        return DiskSync(Path(run_dir) / run_folder.WEIGHTS, announce)
    if kind == "distributed":
        return DistributedSync(backends, bucket_bytes=bucket_mb << 20, run=run, announce=announce, wait=wait,
                               backend=backend, group_name=group_name)
    raise ConfigError(f"rollout.weight_sync: unknown kind {kind!r} (memory, disk, distributed)")
