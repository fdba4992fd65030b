"""The torch.distributed group new weights travel over (`transport.weight_sync distributed`): the learner's
rank 0 is its rank 0, the rollout engines hold ranks 1.. (SGLang's `init_weights_update_group` protocol).
Both sides of it live here, below the trainers, so a backend can join the group the learner forms.

Per bucket the receivers are told the names, dtypes and shapes (for a rollout worker: in the learner's
`WeightVersion` announcement), then rank 0 broadcasts the tensors one by one in that order.
"""

from __future__ import annotations

from datetime import timedelta

import torch

# SGLang's side uses 30 minutes too; a receiver waits that long for a learner still gathering a bucket.
GROUP_TIMEOUT = timedelta(minutes=30)


def group_name(port: int) -> str:
    """The group's name for the rendezvous at `port`: one name per group, so two runs in one process (tests)
    never collide in torch's registry of group names."""
    return f"medvl_weights_{port}"


def init_custom_group(backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                      timeout: timedelta = GROUP_TIMEOUT):
    """A process group next to (or without) the default one: the engines are not part of the learner's group.

    torch.distributed allows one default group per process; this group is created through the same
    rendezvous helper `init_process_group` uses (SGLang's engines do the same on their side). Rank 0
    hosts the rendezvous store; every rank blocks until all `world_size` ranks joined.
    """
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    # torch >= 2.13 refuses a group without an explicit timeout (TypeError).
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store, group_name=group_name,
                                         timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def torch_dtype(name: str) -> torch.dtype:
    """`"bfloat16"` -> torch.bfloat16 (the dtype names of `update_weights_from_distributed`)."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"weight sync: unknown dtype {name!r} (expected a torch dtype name such as bfloat16)")
    return dtype


def receive_bucket(group, dtypes, shapes, device) -> list[torch.Tensor]:
    """The tensors rank 0 broadcasts next over `group`, in order, into fresh buffers on `device`."""
    import torch.distributed as dist

    buffers = [torch.empty(tuple(shape), dtype=torch_dtype(dtype), device=device)
               for dtype, shape in zip(dtypes, shapes, strict=True)]
    for tensor in buffers:
        dist.broadcast(tensor, src=0, group=group)
    return buffers
