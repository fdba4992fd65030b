"""The hf backend on the receiving side of SGLang's weight-group protocol, over a 2-rank gloo group: a
second process plays the learner's rank 0 (torch refuses two ranks of one named group in one process:
"A process group is already registered under the name ..."), the backend joins as rank 1 and receives
the new weights bucket by bucket, copied in place with the version stamped."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny_models import byte_tokenizer, tiny_llama

from medvl_engine.rollout.hf_backend import HFBackend
from medvl_engine.rollout.types import PromptRequest, SamplingParams

# Rank 0: once the backend joined, loads the buckets [(name, tensor), ...] the test saved before joining,
# and broadcasts them in order. Started first, so its imports overlap the test's.
LEARNER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from medvl_engine.rollout.weight_group import init_custom_group
    port, path = int(sys.argv[1]), sys.argv[2]
    group = init_custom_group("gloo", f"tcp://127.0.0.1:{port}", 2, 0, f"test_weights_{port}")
    for bucket in torch.load(path):
        for _, tensor in bucket:
            dist.broadcast(tensor, src=0, group=group)
    dist.barrier(group=group)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def meta(bucket):
    return ([n for n, _ in bucket], [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            [list(t.shape) for _, t in bucket])


def test_the_hf_backend_receives_broadcast_buckets_in_place_and_stamps_the_version(tmp_path):
    port = free_port()
    learner = subprocess.Popen([sys.executable, "-c", LEARNER, str(port), str(tmp_path / "buckets.pt")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        receive_from_learner(tmp_path, port)
        assert learner.wait(timeout=60) == 0, learner.stdout.read()
    finally:
        learner.kill()


def receive_from_learner(tmp_path, port: int) -> None:
    tokenizer = byte_tokenizer()
    backend = HFBackend(tiny_llama(tokenizer, seed=0, hidden=32, layers=1), tokenizer)
    new = dict(tiny_llama(tokenizer, seed=1, hidden=32, layers=1).named_parameters())
    names = list(new)
    good = [[(n, new[n].detach()) for n in names[:3]], [(n, new[n].detach()) for n in names[3:]]]
    # Before them, a bucket whose tensor has the wrong shape for its name: received, refused, model untouched.
    bad_name = names[0]
    bad = [(bad_name, torch.ones(2, 3))]
    torch.save([bad, *good], tmp_path / "buckets.pt")
    before = {n: t.clone() for n, t in backend.model.state_dict().items()}
    storage = {n: t.data_ptr() for n, t in backend.model.state_dict().items()}
    group_name = f"test_weights_{port}"
    request = PromptRequest("p", input_ids=tokenizer("What is 2+2?").input_ids)
    greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=6)

    async def scenario():
        first = await backend.generate(request, greedy)
        await backend.init_weights_update_group("127.0.0.1", port, 1, 2, group_name, "gloo")
        with pytest.raises(ValueError, match=f"{bad_name}.*shape"):
            await backend.update_weights_from_distributed(*meta(bad), version=3, group_name=group_name)
        assert backend.weight_version == 0
        assert all(torch.equal(t, before[n]) for n, t in backend.model.state_dict().items())
        for bucket in good:
            await backend.update_weights_from_distributed(*meta(bucket), version=3, group_name=group_name)
        await asyncio.get_running_loop().run_in_executor(None, _barrier, backend, group_name)
        return first, await backend.generate(request, greedy)

    first, after = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    assert backend.weight_version == 3 and after[0].weight_version == 3 and first[0].weight_version == 0
    state = backend.model.state_dict()
    for name, tensor in new.items():
        assert torch.equal(state[name], tensor), name
        assert state[name].data_ptr() == storage[name]  # copied in place: the model's own storage
    assert not torch.equal(state[names[0]], before[names[0]])
    asyncio.run(backend.shutdown())


def _barrier(backend, group_name):
    import torch.distributed as dist

    dist.barrier(group=backend._groups[group_name][0])


def test_a_bucket_before_joining_the_group_is_an_error_naming_the_call():
    tokenizer = byte_tokenizer()
    backend = HFBackend(tiny_llama(tokenizer, hidden=32, layers=1), tokenizer)
    with pytest.raises(RuntimeError, match="init_weights_update_group"):
        asyncio.run(backend.update_weights_from_distributed(["x"], ["float32"], [[1]], 1, "nowhere"))
    with pytest.raises(ValueError, match="nccl needs|nccl group needs"):
        asyncio.run(backend.init_weights_update_group("127.0.0.1", 1, 1, 2, "g", "nccl"))
    asyncio.run(backend.shutdown())
