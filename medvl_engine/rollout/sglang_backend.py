"""The production backend: one `sglang.Engine` in-process (one tensor-parallel group), driven asynchronously.

Generation is `await engine.async_generate(input_ids=..., image_data=..., sampling_params={..., "n": n},
return_logprob=True)`: one request per prompt, so SGLang preprocesses its images once and shares the
prompt's KV cache across the n samples. With n > 1 SGLang turns the prompt into a batch of one, so its
images go as a list per prompt (`[images]`; a flat list of two or more images fails its batch
normalisation). The log-probs are SGLang's default: the temperature-scaled distribution before
top-k/top-p (the same definition as HFBackend).

Seeds: SGLang honours `sampling_seed` only with deterministic inference on (`from_pretrained` turns it
on), and then the n copies of one request share the seed and come out identical. So a seeded prompt
goes as n requests of one sample each, sample k seeded `derive_seed(seed, k)` (what slime's SGLang
rollout does); they share the prompt's prefix in the radix cache. Unseeded prompts stay one request.

Data-parallel SGLang engines (`dp_size > 1`) are refused: weight updates assert `dp_size == 1`;
replicas go in separate worker processes. Memory release needs the engine started with its memory
saver (`enable_memory_saver=True`, what `from_pretrained(colocated=True)` asks) and an idle scheduler
(generation is paused first).

Control calls (weights, memory, pause) go to the engine's `tokenizer_manager` coroutines with the
request structs of `sglang.srt.managers.io_struct`, exactly what the engine's own synchronous methods
send: those methods block on `loop.run_until_complete`, which cannot run inside the event loop the pool
already runs. A weight update is pause (retract running requests) -> update -> flush_cache -> continue;
requests retracted by the pause resume on the new weights and report the new version.

sglang is imported only when this backend is built (`pip install medvl-engine[sglang]`; it needs a GPU).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams, derive_seed

# The io_struct request types this backend sends, by name (looked up in sglang.srt.managers.io_struct).
REQUEST_TYPES = (
    "UpdateWeightsFromTensorReqInput",
    "UpdateWeightFromDiskReqInput",
    "InitWeightsUpdateGroupReqInput",
    "UpdateWeightsFromDistributedReqInput",
    "ReleaseMemoryOccupationReqInput",
    "ResumeMemoryOccupationReqInput",
    "PauseGenerationReqInput",
    "ContinueGenerationReqInput",
)

# SGLang's `top_k` for "no top-k filter".
_TOP_K_ALL = -1


def sampling_params_for(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """Our SamplingParams as the `sampling_params` dict of `Engine.async_generate` (keys of sglang's SamplingParams).

    `seed` (a request's own) overrides `params.seed`; it becomes sglang's `sampling_seed`.
    """
    out: dict[str, Any] = {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": _TOP_K_ALL if params.top_k == -1 else params.top_k,
        "max_new_tokens": params.max_new_tokens,
    }
    if params.stop:
        out["stop"] = list(params.stop)
    seed = params.seed if seed is None else seed
    if seed is not None:
        out["sampling_seed"] = seed
    return out


def generate_kwargs(request: PromptRequest, params: SamplingParams) -> dict[str, Any]:
    """The keyword arguments of `Engine.async_generate` for one prompt answered `params.n` times."""
    kwargs: dict[str, Any] = {"sampling_params": sampling_params_for(params, request.seed),
                              "return_logprob": params.return_logprobs}
    if request.input_ids is not None:
        kwargs["input_ids"] = list(request.input_ids)
    else:
        kwargs["prompt"] = request.text
    if request.images:
        # n > 1 makes SGLang treat the prompt as a batch of one: images per prompt, i.e. a list of lists.
        kwargs["image_data"] = [list(request.images)] if params.n > 1 else list(request.images)
    return kwargs


def generate_calls(request: PromptRequest, params: SamplingParams) -> list[dict[str, Any]]:
    """The `async_generate` calls that answer `request` n times: one, or, for a seeded request, one per
    sample with its own seed (SGLang gives the n copies of a seeded request the same seed)."""
    seed = request.seed_for(params)
    if seed is None or params.n == 1:
        return [generate_kwargs(request, params)]
    single = replace(params, n=1, seed=None)
    return [generate_kwargs(replace(request, seed=derive_seed(seed, k)), single) for k in range(params.n)]


def completion_from_output(output: dict, version: int, prompt_id: str) -> Completion:
    """One `async_generate` output dict (text, output_ids, meta_info) as a Completion."""
    meta = output.get("meta_info", {})
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else str(finish)
    reason = {"stop": "stop", "length": "length", "abort": "abort"}.get(kind)
    if reason is None:
        raise RuntimeError(f"sglang: prompt {prompt_id!r} finished with unknown reason {finish!r}")
    token_ids = output.get("output_ids")
    if token_ids is None:
        raise RuntimeError(f"sglang: prompt {prompt_id!r}: output has no output_ids (is skip_tokenizer_init off?)")
    logprobs = None
    if "output_token_logprobs" in meta:
        # Entries are (logprob, token_id, token_text_or_None).
        entries = meta["output_token_logprobs"]
        logprobs = [entry[0] for entry in entries]
        ids = [entry[1] for entry in entries]
        if ids != list(token_ids):
            raise RuntimeError(f"sglang: prompt {prompt_id!r}: log-prob token ids differ from output_ids")
    return Completion(token_ids=token_ids, text=output.get("text", ""), logprobs=logprobs, finish_reason=reason,
                      weight_version=_version_of(meta, version))


def _version_of(meta: dict, default: int) -> int:
    try:
        return int(meta.get("weight_version"))
    except (TypeError, ValueError):
        return default


def _io_struct_types() -> SimpleNamespace:
    from sglang.srt.managers import io_struct

    return SimpleNamespace(**{name: getattr(io_struct, name) for name in REQUEST_TYPES})


class SGLangBackend(Backend):
    """A `sglang.Engine` behind the Backend interface.

    `engine` is a built `sglang.Engine` (or anything with its `async_generate`, `tokenizer_manager` and
    `shutdown`); `request_types` maps the names in REQUEST_TYPES to constructors (default: sglang's
    io_struct classes). Use `from_pretrained` to build the engine.
    """

    name = "sglang"

    def __init__(self, engine, *, weight_version: int = 0, request_types: Any = None):
        dp_size = getattr(getattr(engine, "server_args", None), "dp_size", 1) or 1
        if dp_size > 1:
            raise ValueError(f"sglang: an engine with dp_size={dp_size}: SGLang's weight updates need dp_size 1; run "
                             "data-parallel replicas as separate rollout workers (one engine each)")
        self.engine = engine
        self.types = request_types if request_types is not None else _io_struct_types()
        self._version = int(weight_version)
        self._update_lock = asyncio.Lock()

    @classmethod
    def from_pretrained(cls, path: str, *, weight_version: int = 0, colocated: bool = False,
                        **engine_kwargs) -> SGLangBackend:
        """Start `sglang.Engine(model_path=path, **engine_kwargs)` in this process (tp_size, mem_fraction_static...).

        Deterministic inference is on unless `engine_kwargs` says otherwise (seeds take effect only then);
        `colocated` (the engine shares its GPUs with the learner) turns the memory saver on so that
        `release_memory` can free the GPU for the update.
        """
        try:
            import sglang
        except ImportError as exc:
            raise ImportError("the sglang backend needs sglang: pip install 'medvl-engine[sglang]'") from exc
        engine_kwargs.setdefault("enable_deterministic_inference", True)
        if colocated:
            engine_kwargs.setdefault("enable_memory_saver", True)
        # Versions travel as strings in SGLang; start the engine at ours so its outputs report it.
        engine = sglang.Engine(model_path=path, weight_version=str(weight_version), **engine_kwargs)
        return cls(engine, weight_version=weight_version)

    @property
    def weight_version(self) -> int:
        return self._version

    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        version = self._version
        results = await asyncio.gather(*(self.engine.async_generate(**kwargs)
                                         for kwargs in generate_calls(request, params)))
        outputs = [o for result in results for o in (result if isinstance(result, list) else [result])]
        if len(outputs) != params.n:
            raise RuntimeError(f"sglang: prompt {request.prompt_id!r}: {len(outputs)} outputs for n={params.n}")
        return [completion_from_output(o, version, request.prompt_id) for o in outputs]

    async def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        named = list(named_tensors)
        # The engine's own serialisation: one payload per tensor-parallel rank.
        payloads = self.engine._serialize_tensors_per_rank(named, None)
        request = self.types.UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=payloads, load_format=None, flush_cache=False, weight_version=str(version)
        )
        await self._update("update_weights_from_tensor", request, version)

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        request = self.types.UpdateWeightFromDiskReqInput(model_path=path, flush_cache=False,
                                                          weight_version=str(version))
        await self._update("update_weights_from_disk", request, version)

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> None:
        request = self.types.InitWeightsUpdateGroupReqInput(
            master_address=master_address, master_port=master_port, rank_offset=rank_offset,
            world_size=world_size, group_name=group_name, backend=backend,
        )
        _check(await self.engine.tokenizer_manager.init_weights_update_group(request, None),
               "init_weights_update_group")

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], version: int,
                                              group_name: str = "weight_update_group") -> None:
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"update_weights_from_distributed: {len(names)} names, {len(dtypes)} dtypes and "
                             f"{len(shapes)} shapes (must be equal)")
        request = self.types.UpdateWeightsFromDistributedReqInput(
            names=list(names), dtypes=list(dtypes), shapes=[list(s) for s in shapes], group_name=group_name,
            flush_cache=False, weight_version=str(version),
        )
        await self._update("update_weights_from_distributed", request, version)

    async def _update(self, method: str, request, version: int) -> None:
        """pause (retract) -> update -> flush_cache -> continue; one update at a time."""
        manager = self.engine.tokenizer_manager
        async with self._update_lock:
            await self.pause()
            try:
                _check(await getattr(manager, method)(request, None), method)
                flushed = await manager.flush_cache()
                if not getattr(flushed, "success", True):
                    raise RuntimeError(f"sglang: flush_cache after {method} failed: {flushed!r}")
                self._version = int(version)
            finally:
                await self.resume()

    async def pause(self) -> None:
        # "retract": running requests go back to the queue and finish after `resume` (nothing is aborted).
        await self.engine.tokenizer_manager.pause_generation(self.types.PauseGenerationReqInput(mode="retract"))

    async def resume(self) -> None:
        await self.engine.tokenizer_manager.continue_generation(self.types.ContinueGenerationReqInput())

    async def release_memory(self) -> None:
        """Weights and KV cache off the GPU (needs the memory saver; the scheduler must be idle: paused first)."""
        await self.pause()
        _check(await self.engine.tokenizer_manager.release_memory_occupation(
            self.types.ReleaseMemoryOccupationReqInput(), None), "release_memory_occupation")

    async def resume_memory(self) -> None:
        _check(await self.engine.tokenizer_manager.resume_memory_occupation(
            self.types.ResumeMemoryOccupationReqInput(), None), "resume_memory_occupation")
        await self.resume()

    async def health(self) -> bool:
        """One token of greedy generation answers within 20 s (SGLang's /health_generate does the same)."""
        probe = PromptRequest("health", input_ids=[0])
        try:
            await asyncio.wait_for(self.generate(probe, SamplingParams(n=1, temperature=0.0, max_new_tokens=1)), 20)
        except Exception:  # noqa: BLE001 - health reports, never raises
            return False
        return True

    async def shutdown(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.engine.shutdown)


def _check(result, what: str) -> None:
    """Control calls return (success, message) tuples (or objects with .success/.message)."""
    if isinstance(result, tuple) and len(result) >= 2:
        success, message = result[0], result[1]
    else:
        success, message = getattr(result, "success", True), getattr(result, "message", "")
    if not success:
        raise RuntimeError(f"sglang: {what} failed: {message}")
