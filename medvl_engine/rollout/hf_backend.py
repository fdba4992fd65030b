"""The reference backend: transformers `generate`, batched with left padding, on CPU or GPU.

Requests queue up; one runner task takes as many compatible requests as fit in `max_batch` sequences
(each request contributes its `n` copies) and runs one `generate` call in a worker thread, so the
event loop keeps scheduling while the model computes. Weight updates go through the same single
thread, so they land between two batches, never inside one.

Log-probs: for each sampled token the engine returns `log_softmax(logits / temperature)[token]` —
the temperature-scaled distribution *before* top-k/top-p truncation, which is what SGLang and vLLM
return by default and what a learner recomputes from its own forward pass (divide the logits by the
rollout temperature, log-softmax, gather). Greedy decoding (temperature 0) returns the raw
`log_softmax(logits)[token]`. They are taken in float32 at each step, as the token is chosen
(`hf_sampler.RequestSampler`), so no step's full logits outlive it.

Reproducibility: every request samples from its own `torch.Generator`, seeded with the request's seed
(`PromptRequest.seed`, else `SamplingParams.seed`) or, without one, from torch's global RNG; so seeded
requests share batches with anything else and still draw the same answers (up to the float rounding
of a different batch shape). The model's own `generation_config` sampling defaults (repetition
penalty, top-k, ...) are ignored: the engine samples exactly as `SamplingParams` say.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from medvl_engine.errors import ConfigError
from medvl_engine.rollout.backend import Backend
from medvl_engine.rollout.hf_sampler import RequestSampler
from medvl_engine.rollout.types import Completion, PromptRequest, SamplingParams


@dataclass
class _Job:
    request: PromptRequest
    params: SamplingParams
    future: asyncio.Future


class HFBackend(Backend):
    """transformers `generate` behind the Backend interface.

    `tokenizer_or_processor` is a tokenizer for text-only models, or a processor with an
    `image_processor` and a `tokenizer` (Qwen2.5-VL) for prompts with images. `max_batch` bounds the
    sequences of one generate call (a request with `n > max_batch` still runs whole, alone).
    """

    name = "hf"

    def __init__(self, model, tokenizer_or_processor, *, device: str = "cpu", max_batch: int = 16,
                 weight_version: int = 0):
        from transformers import GenerationConfig

        if max_batch < 1:
            raise ValueError(f"HFBackend: max_batch must be >= 1, got {max_batch}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = tokenizer_or_processor
        self.tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
        self.max_batch = max_batch
        self._version = int(weight_version)
        self._eos_ids = _eos_ids(model, self.tokenizer)
        if not self._eos_ids:
            raise ConfigError("HFBackend: neither the model's generation_config nor the tokenizer names an EOS token")
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad) if pad is not None else min(self._eos_ids)
        # Only the token ids survive from the checkpoint's generation defaults (see module docstring).
        self.model.generation_config = GenerationConfig(
            eos_token_id=sorted(self._eos_ids), pad_token_id=self._pad_id,
            bos_token_id=getattr(model.generation_config, "bos_token_id", None),
        )
        self._pending: deque[_Job] = deque()
        self._paused = False
        self._work: asyncio.Event | None = None
        self._running: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        # One thread: generate calls and weight copies are serialised, never concurrent.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-backend")
        self._closed = False
        # torch.distributed groups joined for weight updates (`init_weights_update_group`): name -> (group, backend)
        self._groups: dict[str, tuple[object, str]] = {}

    @classmethod
    def from_pretrained(cls, path: str, *, device: str = "cpu", dtype: str | torch.dtype | None = None,
                        max_batch: int = 16, weight_version: int = 0) -> HFBackend:
        """Load a Hugging Face folder: a causal LM with its tokenizer, or a vision-language model with its processor."""
        model, processor = load_model_and_processor(path, dtype=dtype)
        return cls(model, processor, device=device, max_batch=max_batch, weight_version=weight_version)

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """The tokens that end an answer (the model's generation_config and the tokenizer's EOS)."""
        return frozenset(self._eos_ids)

    @property
    def pad_token_id(self) -> int:
        return self._pad_id

    # -- generation ---------------------------------------------------------------------------------

    async def generate(self, request: PromptRequest, params: SamplingParams) -> list[Completion]:
        if self._closed:
            raise RuntimeError("HFBackend: generate called after shutdown")
        if request.images and not hasattr(self.processor, "image_processor"):
            raise ValueError(
                f"HFBackend: prompt {request.prompt_id!r} has {len(request.images)} image(s) but the backend "
                "was given a tokenizer, not a processor with an image_processor"
            )
        self._ensure_runner()
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(request, params, future))
        self._work.set()
        return await future

    def _ensure_runner(self) -> None:
        """Start the batch runner on the running loop (again, when a previous loop has gone)."""
        loop = asyncio.get_running_loop()
        if self._runner is not None and not self._runner.done() and self._runner.get_loop() is loop:
            return
        self._pending = deque(job for job in self._pending if job.future.get_loop() is loop)
        self._work, self._running = asyncio.Event(), asyncio.Event()
        if not self._paused:
            self._running.set()
        self._runner = loop.create_task(self._run_batches(), name="hf-backend-runner")

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._work.clear()
                await self._work.wait()
            await self._running.wait()
            batch = self._take_batch()
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._generate_batch, batch)
            except Exception as exc:  # noqa: BLE001 - the error belongs to the callers of this batch
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, completions in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(completions)

    def _take_batch(self) -> list[_Job]:
        """The first live request plus every later one that can share its generate call."""
        while self._pending and self._pending[0].future.done():  # cancelled by a timeout while queued
            self._pending.popleft()
        if not self._pending:
            return []
        first = self._pending.popleft()
        key = _batch_key(first)
        batch, total, keep = [first], first.params.n, deque()
        while self._pending:
            job = self._pending.popleft()
            if job.future.done():
                continue
            if _batch_key(job) == key and total + job.params.n <= self.max_batch:
                batch.append(job)
                total += job.params.n
            else:
                keep.append(job)
        self._pending = keep
        return batch

    def _generate_batch(self, batch: list[_Job]) -> list[list[Completion]]:
        from transformers import GenerationConfig, LogitsProcessorList

        params = batch[0].params
        version = self._version
        requests = [job.request for job in batch for _ in range(job.params.n)]
        inputs = self._encode([job.request for job in batch], [job.params.n for job in batch])
        sampler = RequestSampler(
            [job.params.n for job in batch], [None if params.greedy else self._generator(job) for job in batch],
            temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
            record_logprobs=params.return_logprobs,
        )
        # do_sample=False: the sampler picks every token (one RNG per request) and generate takes its argmax.
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, eos_token_id=sorted(self._eos_ids),
            pad_token_id=self._pad_id, stop_strings=list(params.stop) or None, return_dict_in_generate=False,
        )
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, generation_config=config,
                                            logits_processor=LogitsProcessorList([sampler]),
                                            tokenizer=self.tokenizer if params.stop else None)
        tokens = sequences[:, inputs["input_ids"].shape[1]:].cpu().numpy()
        logprobs = sampler.logprobs().cpu().numpy() if params.return_logprobs else None
        if logprobs is not None and logprobs.shape != tokens.shape:
            raise RuntimeError(f"HFBackend: {logprobs.shape[1]} log-prob steps for {tokens.shape[1]} new tokens")
        completions = [
            self._completion(tokens[i], None if logprobs is None else logprobs[i], params.stop, version)
            for i in range(len(requests))
        ]
        grouped, start = [], 0
        for job in batch:
            grouped.append(completions[start : start + job.params.n])
            start += job.params.n
        return grouped

    def _generator(self, job: _Job) -> torch.Generator:
        seed = job.request.seed_for(job.params)
        if seed is None:
            # From the global RNG, so a caller's torch.manual_seed still fixes unseeded runs.
            seed = int(torch.randint(0, 2**62, (1,)).item())
        return torch.Generator(device=self.device).manual_seed(seed)

    def _encode(self, requests: list[PromptRequest], repeats: list[int]) -> dict[str, torch.Tensor]:
        """The model inputs of `requests`, request i as `repeats[i]` rows (its n answers), left-padded.

        A prompt's images go through the image processor once, not once per answer (verl #5171: n times the
        preprocessing): its pixel rows are then repeated, so the inputs equal processing every row."""
        counts = torch.tensor(repeats)
        if any(r.images for r in requests):
            texts = [r.text if r.text is not None else self.tokenizer.decode(r.input_ids) for r in requests]
            # One flat list, in row order: rows without images (0 of them) have no placeholder to fill.
            encoded = self.processor(text=texts, images=[im for r in requests for im in r.images], padding=True,
                                     padding_side="left", return_tensors="pt")
            return {k: v.to(self.device) for k, v in _repeat_rows(encoded, requests, counts).items()}
        ids = [r.input_ids if r.input_ids is not None else self.tokenizer(r.text, add_special_tokens=False).input_ids
               for r in requests]
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, width - len(x):] = torch.tensor(x, dtype=torch.long)
            attention_mask[row, width - len(x):] = 1
        return {"input_ids": input_ids.repeat_interleave(counts, 0).to(self.device),
                "attention_mask": attention_mask.repeat_interleave(counts, 0).to(self.device)}

    def _completion(self, tokens: np.ndarray, logprobs: np.ndarray | None, stop: tuple[str, ...],
                    version: int) -> Completion:
        """Cut one generated row at its end (EOS kept, padding dropped) and name why it ended."""
        end, reason = len(tokens), "length"
        for i, token in enumerate(tokens.tolist()):
            if token in self._eos_ids:
                end, reason = i + 1, "stop"
                break
        text = self.tokenizer.decode(tokens[:end], skip_special_tokens=True)
        hits = [(text.find(s), s) for s in stop if s in text]
        if hits:
            at, matched = min(hits)
            end = self._first_prefix_containing(tokens, end, matched)
            text, reason = self.tokenizer.decode(tokens[:end], skip_special_tokens=True), "stop"
            text = text[: text.find(matched)]
        return Completion(
            token_ids=tokens[:end], text=text, logprobs=None if logprobs is None else logprobs[:end],
            finish_reason=reason, weight_version=version,
        )

    def _first_prefix_containing(self, tokens: np.ndarray, end: int, needle: str) -> int:
        """Smallest t <= end with `needle` in decode(tokens[:t]) (binary search: log2(T) decodes, not T)."""
        lo, hi = 1, end
        while lo < hi:
            mid = (lo + hi) // 2
            if needle in self.tokenizer.decode(tokens[:mid], skip_special_tokens=True):
                hi = mid
            else:
                lo = mid + 1
        return lo

    # -- weights and memory -------------------------------------------------------------------------

    async def update_weights_from_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                                          version: int) -> None:
        named = list(named_tensors)
        await self._in_model_thread(self._copy_weights, named, int(version))

    async def update_weights_from_disk(self, path: str, version: int) -> None:
        def load_and_copy():
            fresh = type(self.model).from_pretrained(path, dtype=self.model.dtype)
            self._copy_weights(list(fresh.state_dict().items()), int(version))

        await self._in_model_thread(load_and_copy)

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str = "weight_update_group",
                                        backend: str = "nccl") -> None:
        """Join the learner's group as rank `rank_offset` (one rank: this backend is one model); blocks until
        every rank joined. gloo on the CPU, nccl with the model on a GPU."""
        from medvl_engine.rollout.weight_group import init_custom_group

        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"HFBackend on {self.device}: a nccl group needs the model on a GPU; use gloo")
        if group_name in self._groups:
            raise RuntimeError(f"HFBackend: already in the weight update group {group_name!r}")
        group = await self._in_model_thread(init_custom_group, backend, f"tcp://{master_address}:{master_port}",
                                            world_size, rank_offset, group_name)
        self._groups[group_name] = (group, backend)

    async def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                              shapes: Sequence[Sequence[int]], version: int,
                                              group_name: str = "weight_update_group") -> None:
        """Receive one bucket: rank 0 broadcasts the tensors `names` (with these dtypes and shapes) in order;
        they are copied into the model in place on the model thread (between two generate batches), then
        the backend runs policy `version`. A name or shape the model does not have leaves the model as it
        was, after the whole bucket was received (the group stays in step)."""
        if not len(names) == len(dtypes) == len(shapes):
            raise ValueError(f"update_weights_from_distributed: {len(names)} names, {len(dtypes)} dtypes and "
                             f"{len(shapes)} shapes (must be equal)")
        if group_name not in self._groups:
            raise RuntimeError(f"HFBackend: update_weights_from_distributed over {group_name!r} before "
                               "init_weights_update_group joined it")
        await self._in_model_thread(self._receive_weights, group_name, list(names), list(dtypes),
                                    [tuple(s) for s in shapes], int(version))

    def _receive_weights(self, group_name: str, names: list[str], dtypes: list[str], shapes: list[tuple],
                         version: int) -> None:
        from medvl_engine.rollout.weight_group import receive_bucket

        group, backend = self._groups[group_name]
        device = self.device if backend == "nccl" else torch.device("cpu")
        tensors = receive_bucket(group, dtypes, shapes, device)
        self._copy_weights(list(zip(names, tensors)), version)

    def _copy_weights(self, named: list[tuple[str, torch.Tensor]], version: int) -> None:
        target = self.model.state_dict(keep_vars=True)
        # Check every name and shape before touching a weight: a bad update leaves the model as it was.
        for name, tensor in named:
            if name not in target:
                model = type(self.model).__name__
                raise KeyError(f"HFBackend: weight {name!r} is not a parameter or buffer of {model}")
            if tuple(tensor.shape) != tuple(target[name].shape):
                raise ValueError(f"HFBackend: weight {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(target[name].shape)}")
        with torch.no_grad():
            for name, tensor in named:
                target[name].copy_(tensor)
        self._version = version

    async def pause(self) -> None:
        self._paused = True
        if self._running is not None:
            self._running.clear()

    async def resume(self) -> None:
        self._paused = False
        if self._running is not None:
            self._running.set()

    async def release_memory(self) -> None:
        if self.device.type == "cuda":
            await self._in_model_thread(self._move, torch.device("cpu"))

    async def resume_memory(self) -> None:
        if self.device.type == "cuda":
            await self._in_model_thread(self._move, self.device)

    def _move(self, device: torch.device) -> None:
        self.model.to(device)
        if device.type == "cpu":
            torch.cuda.empty_cache()

    async def health(self) -> bool:
        return not self._closed and (self._runner is None or not self._runner.done())

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("HFBackend: shut down before this request ran"))
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    async def _in_model_thread(self, fn, *args):
        if self._closed:
            raise RuntimeError("HFBackend: called after shutdown")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


def _batch_key(job: _Job) -> tuple:
    p = job.params
    return (p.temperature, p.top_p, p.top_k, p.max_new_tokens, p.stop, p.return_logprobs, bool(job.request.images))


def _eos_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return {int(i) for i in ids}


def _repeat_rows(encoded, requests: list[PromptRequest], counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """A processor's output for one row per request, as `counts[i]` rows of request i: per-row tensors repeat
    their row; `pixel_values` repeats each request's block of image rows (Qwen2-VL's flattened patches: t*h*w
    rows an image, as `image_grid_thw` says; otherwise one row an image), `image_grid_thw` its images' lines."""
    images = [len(r.images) for r in requests]
    grid = encoded.get("image_grid_thw")
    per_image = grid.prod(-1).tolist() if grid is not None else [1] * sum(images)
    out = {}
    for key, value in encoded.items():
        if key in ("pixel_values", "image_grid_thw"):
            sizes = per_image if key == "pixel_values" else [1] * sum(images)
            blocks = list(torch.split(value, sizes))
            by_request, start = [], 0
            for count in images:
                by_request.append(torch.cat(blocks[start:start + count]) if count else value[:0])
                start += count
            out[key] = torch.cat([block for block, n in zip(by_request, counts.tolist()) for _ in range(n)])
        elif torch.is_tensor(value) and value.dim() and value.shape[0] == len(requests):
            out[key] = value.repeat_interleave(counts, 0)
        else:
            out[key] = value
    return out


def load_model_and_processor(path: str, *, dtype: str | torch.dtype | None = None):
    """A Hugging Face folder's model and its tokenizer (text) or processor (vision-language)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from medvl_engine.vision import is_vision_model, load_processor

    kwargs = {} if dtype is None else {"dtype": dtype}
    if not is_vision_model(path):
        return AutoModelForCausalLM.from_pretrained(path, **kwargs), load_processor(path)
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs), load_processor(path)
