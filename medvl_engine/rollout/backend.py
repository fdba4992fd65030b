"""The interface every generation engine implements for the RolloutPool, and `make_backend` to pick one.

A backend answers one prompt `n` times (`generate`), reports which policy version it runs
(`weight_version`), takes new weights three ways (named tensors in-process, a torch.distributed
broadcast, a Hugging Face folder on disk), and can pause, free and regain its memory (for a learner
sharing the GPUs). Everything is `async`: the pool drives many backends from one event loop, so a
backend never blocks the loop (engines run in their own processes or threads).

Backends: `hf` (transformers `generate`, the reference; medvl_engine.rollout.hf_backend), `sglang`
(`sglang.Engine` in-process; medvl_engine.rollout.sglang_backend) and `vllm` (vLLM's `AsyncLLM`;
medvl_engine.rollout.vllm_backend); the engine packages are imported only when chosen.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence

from medvl_engine.errors import ConfigError
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams

BACKENDS = ("hf", "sglang", "vllm")


class Backend(abc.ABC):
    """An async generation engine the RolloutPool can drive."""

    name: str = "backend"

    @property
    @abc.abstractmethod
    def weight_version(self) -> int:
        """The policy version of the weights answers are generated with now."""

    @abc.abstractmethod
    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        """Answer `request` `params.n` times; returns exactly `params.n` completions."""

    @abc.abstractmethod
    async def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, object]], version: int) -> None:
        """Load `(name, tensor)` pairs (Hugging Face parameter names) in place; then run policy `version`."""

    @abc.abstractmethod
    async def update_weights_from_disk(self, path: str, version: int) -> None:
        """Load the weights of the Hugging Face folder `path` in place; then run policy `version`."""

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> None:
        """Join the torch.distributed group the learner broadcasts new weights over (rank 0 is the learner)."""
        raise NotImplementedError(f"the {self.name} backend cannot receive weights over torch.distributed")

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        version: int,
        group_name: str = "weight_update_group",
    ) -> None:
        """Receive the named tensors the learner broadcasts over the group; then run policy `version`."""
        raise NotImplementedError(f"the {self.name} backend cannot receive weights over torch.distributed")

    @abc.abstractmethod
    async def pause(self) -> None:
        """Stop starting new work (requests wait); used around weight updates."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Undo `pause`."""

    @abc.abstractmethod
    async def release_memory(self) -> None:
        """Free the accelerator memory of weights and caches (colocated learner's turn)."""

    @abc.abstractmethod
    async def resume_memory(self) -> None:
        """Take the memory back after `release_memory`."""

    @abc.abstractmethod
    async def health(self) -> bool:
        """True when the engine answers; never raises."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and free everything; the backend is unusable afterwards."""


def make_backend(name: str, model_path: str, **kwargs) -> Backend:
    """Build the backend called `name` for the Hugging Face folder `model_path`.

    `kwargs` go to the backend: for `hf`, `HFBackend.from_pretrained` (device, dtype, max_batch); for
    `sglang`, `sglang.Engine` (tp_size, mem_fraction_static, ...). The engine packages are imported
    here, only for the backend asked for.
    """
    if name == "hf":
        from medvl_engine.rollout.hf_backend import HFBackend

        return HFBackend.from_pretrained(model_path, **kwargs)
    if name == "sglang":
        from medvl_engine.rollout.sglang_backend import SGLangBackend

        return SGLangBackend.from_pretrained(model_path, **kwargs)
    if name == "vllm":
        from medvl_engine.rollout.vllm_backend import VLLMBackend

        return VLLMBackend.from_pretrained(model_path, **kwargs)
    raise ConfigError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
