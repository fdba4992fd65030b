"""Pushing new policy weights from the learner to the rollout backends, with a version number.

Three ways, one interface (`push(learner, version)`, collective over the learner's ranks):

- `MemorySync`: a backend in the learner's own process (the hf backend of a colocated run, tests):
  `update_weights_from_tensors`, bucket by bucket, no copy through disk.
- `DiskSync`: a Hugging Face folder per version under `run_dir/weights/`, then a `WeightVersion`
  announcement; each worker pauses, loads it (`update_weights_from_disk`), flushes its cache and
  continues. Works across processes and nodes that share a file system.
- `DistributedSync`: SGLang's path: the engines join a torch.distributed (NCCL) group with the
  learner's rank 0 (`init_weights_update_group`); for every bucket the engines are told the names,
  dtypes and shapes (`update_weights_from_distributed`) while rank 0 broadcasts the tensors. Under
  ZeRO-3 every rank takes part in gathering a bucket, rank 0 alone broadcasts it. It needs GPUs
  and NCCL on both sides: on a CPU-only machine it is code, not a tested path.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from medvl_engine.profiling import stage
from medvl_engine.transport.messages import WeightVersion


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
    """Bucketed broadcast over a torch.distributed group to SGLang engines (`Backend` objects or clients).

    `engines` expose the Backend coroutines `init_weights_update_group` and
    `update_weights_from_distributed`; the engine ranks are 1..world_size-1 of the group, the
    learner's rank 0 is its rank 0. Call `connect(...)` once on every learner rank, then `push` after
    every step.
    """

    def __init__(self, engines: Iterable, *, bucket_bytes: int = 512 << 20, group_name: str = "medvl_weights",
                 backend: str = "nccl", run: Callable | None = None):
        self.engines = list(engines)
        self.bucket_bytes = bucket_bytes
        self.group_name = group_name
        self.backend = backend
        self.run = run or asyncio.run
        self.group = None
        self.pool = ThreadPoolExecutor(max_workers=max(1, len(self.engines)))

    def connect(self, learner, master_address: str, master_port: int, engine_world_sizes: list[int]) -> None:
        """Form the group: learner rank 0 is rank 0, engine i holds ranks offset_i .. offset_i + size_i - 1."""
        if learner.rank != 0:
            return
        world_size = 1 + sum(engine_world_sizes)
        offsets = [1 + sum(engine_world_sizes[:i]) for i in range(len(engine_world_sizes))]
        futures = [self.pool.submit(self.run, engine.init_weights_update_group(
            master_address, master_port, offset, world_size, self.group_name, self.backend))
            for engine, offset in zip(self.engines, offsets)]
        self.group = _init_custom_group(self.backend, f"tcp://{master_address}:{master_port}", world_size, 0,
                                        self.group_name)
        for f in futures:
            f.result()

    def push(self, learner, version: int) -> dict:
        import torch.distributed as dist

        if learner.rank == 0 and self.group is None:
            raise RuntimeError("DistributedSync.push before connect()")
        start = time.perf_counter()
        nbytes = 0
        for bucket in learner.full_parameters(self.bucket_bytes):
            if learner.rank != 0:
                continue  # other ranks only help gather ZeRO-3 shards
            names = [n for n, _ in bucket]
            dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
            shapes = [list(t.shape) for _, t in bucket]
            futures = [self.pool.submit(self.run, engine.update_weights_from_distributed(
                names, dtypes, shapes, version, self.group_name)) for engine in self.engines]
            with stage("weight_sync/broadcast"):
                for _, tensor in bucket:
                    dist.broadcast(tensor.contiguous(), src=0, group=self.group)
                    nbytes += tensor.numel() * tensor.element_size()
                for f in futures:
                    f.result()
        return {"sync_seconds": time.perf_counter() - start, "sync_bytes": nbytes}


def _init_custom_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str):
    """A second process group next to the default one (the engines are not part of the learner's group).

    torch.distributed allows one default group per process; the engines' group is created through
    the same rendezvous helper `init_process_group` uses (SGLang's engines do the same on their side).
    """
    from datetime import timedelta

    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    # torch >= 2.13 refuses a group without an explicit timeout (TypeError); 30 min as SGLang's side uses.
    timeout = timedelta(minutes=30)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def make_sync(kind: str, *, run_dir: str | Path, backends: Iterable = (), announce=None, bucket_mb: int = 512,
              run: Callable | None = None):
    """The sync for `transport.weight_sync`: memory (backends in this process), disk, distributed (a
    DistributedSync needs `connect(...)` with engines that join its group; `grpo` offers memory and disk)."""
    if kind == "memory":
        return MemorySync(backends, bucket_bytes=bucket_mb << 20, run=run)
    if kind == "disk":
        return DiskSync(Path(run_dir) / "weights", announce)
    if kind == "distributed":
        return DistributedSync(backends, bucket_bytes=bucket_mb << 20, run=run)
    raise ValueError(f"rollout.weight_sync: unknown kind {kind!r} (memory, disk, distributed)")
