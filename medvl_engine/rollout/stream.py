"""PromptStream: the one owner of data order, per-position sample seeds, sharding and the resume position.

    samples = load_data(DataConfig(source="bundled", text_only=True))
    stream = PromptStream(samples, processor, shuffle_seed=42, sample_seed=0, shard=0, num_shards=2)
    for request in stream.requests(start=0):        # PromptRequest with .position and .seed
        ...

Position k of a stream is sample `order(epoch)[k mod N]` of epoch `k // N`, where the order is the
dataset order or a permutation that is a function of (shuffle seed, epoch) only, and it samples with
`derive_seed(sample_seed, k)`. So position k is the same question with the same seed whoever
generates it: the colocated learner, rollout worker i of W (it takes the positions k = i mod W),
a resumed run, an evaluation (one epoch in dataset order). Requests are built lazily, as a pool pulls
them, so images are decoded and prompts rendered only when their turn comes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np

from medvl_engine.errors import ConfigError, DataError
from medvl_engine.rollout.config import DataConfig
from medvl_engine.rollout.types import PromptRequest, derive_seed

logger = logging.getLogger(__name__)


def load_data(cfg: DataConfig) -> list:
    """The questions of `cfg` in dataset order: subset by dataset_name, text-only filter or image removal,
    then the first `max_samples`. Shuffling is the stream's job (`epoch_order`)."""
    from medvl_engine.data import load_bundled, load_samples

    if cfg.source == "bundled":
        samples = list(load_bundled(skip_invalid=cfg.skip_invalid))
    else:
        samples = list(load_samples(cfg.source, split=cfg.split, skip_invalid=cfg.skip_invalid))
    if cfg.subset:
        present = {s.dataset_name for s in samples}
        unknown = sorted(set(cfg.subset) - present)
        if unknown:
            raise ConfigError(f"data.subset: {unknown} not in {cfg.source} (its datasets: {sorted(present)})")
        samples = [s for s in samples if s.dataset_name in cfg.subset]
    if cfg.text_only:
        kept = [s for s in samples if not s.images]
        if len(kept) < len(samples):
            logger.info("data.text_only: kept %d of %d questions (the others have images)", len(kept), len(samples))
        samples = kept
    if cfg.ignore_images:
        samples = [replace(s, images=[]) if s.images else s for s in samples]
    if cfg.max_samples:
        samples = samples[: cfg.max_samples]
    if not samples:
        raise DataError(f"data.source {cfg.source!r} (split {cfg.split!r}) has no questions left"
                        + (" without images (data.text_only)" if cfg.text_only else "")
                        + (f" in data.subset {cfg.subset}" if cfg.subset else ""))
    return samples


def epoch_order(n: int, shuffle_seed: int | None, epoch: int) -> np.ndarray:
    """The order of epoch `epoch` over `n` items: dataset order, or a permutation of (seed, epoch) only."""
    if shuffle_seed is None:
        return np.arange(n)
    return np.random.default_rng([shuffle_seed, epoch]).permutation(n)


def load_renderer(path: str):
    """The tokenizer (text model) or processor (vision-language model) whose chat template renders prompts."""
    from medvl_engine.vision import load_processor

    return load_processor(path)


def backend_renderer(backend, path: str):
    """What renders prompts for `backend`: its own processor or tokenizer (hf), else the folder's."""
    return getattr(backend, "processor", None) or load_renderer(path)


def build_request(renderer, sample, prompt_id: str, *, seed: int | None = None, position: int = -1,
                  max_prompt_tokens: int | None = None, render: Callable | None = None) -> PromptRequest:
    """The prompt of `sample` (MedVLThinker's, through the model's chat template, unless a task brings its
    own `render(renderer, sample) -> str`) as text and token ids (images as one placeholder each; the
    engine expands them), with its images, seed and position.

    Checked here, before anything is generated, naming the row: the image placeholders pair up with the
    images (`DataError`), and the prompt with its image tokens expanded as the processor expands them, the
    length the learner checks, fits `max_prompt_tokens` (`ConfigError`; prompts are never truncated)."""
    from medvl_engine.prompts import render_prompt
    from medvl_engine.vision import expanded_length

    where = f"{sample.dataset_name}[{sample.dataset_index}] (prompt {prompt_id})"
    text = (render or render_prompt)(renderer, sample)
    tokenizer = getattr(renderer, "tokenizer", renderer)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    _check_image_placeholders(renderer, sample, input_ids, where)
    if max_prompt_tokens is not None:
        length = expanded_length(input_ids, sample.images, renderer)
        if length > max_prompt_tokens:
            images = f" ({len(input_ids)} + the tokens of {len(sample.images)} image(s))" if sample.images else ""
            raise ConfigError(f"{where}: the prompt has {length} tokens{images} > rollout.max_prompt_tokens "
                              f"{max_prompt_tokens} (prompts are never truncated)")
    return PromptRequest(prompt_id, input_ids=input_ids, text=text, images=list(sample.images), sample=sample,
                         seed=seed, position=position)


def _check_image_placeholders(renderer, sample, input_ids: list[int], where: str) -> None:
    """A `DataError` naming the row, and the field when a text field holds the placeholder, unless the
    prompt's image placeholders and the sample's images pair up (with or without images). The chat template
    places one placeholder per image (`prompts.build_messages`), so an extra one comes from the row's text
    and a missing one from a render that dropped the images."""
    from medvl_engine.vision import placeholder_mismatch

    mismatch = placeholder_mismatch(input_ids, len(sample.images), renderer)
    if mismatch is None:
        return
    token = getattr(renderer, "tokenizer", renderer).convert_ids_to_tokens(renderer.image_token_id)
    fields = {"field 'question'": sample.question, **{f"field 'options'[{k}]": v for k, v in sample.options.items()}}
    holders = [name for name, value in fields.items() if token in value]
    found = f"; the row's text holds the placeholder {token!r} ({', '.join(holders)})" if holders else ""
    raise DataError(f"{where}: {mismatch}{found}")


class PromptStream:
    """Stream positions -> prompt requests; see the module docstring for what a position means."""

    def __init__(self, samples: Sequence, renderer, *, shuffle_seed: int | None, sample_seed: int | None,
                 shard: int = 0, num_shards: int = 1, stop: int | None = None,
                 max_prompt_tokens: int | None = None, skip: Callable[[int], bool] | None = None,
                 render: Callable | None = None):
        if not samples:
            raise ValueError("PromptStream: no samples")
        if not 0 <= shard < num_shards:
            raise ValueError(f"PromptStream: shard {shard} is not in [0, {num_shards})")
        if stop is not None and stop < 0:
            raise ValueError(f"PromptStream: stop must be >= 0 or None, got {stop}")
        self.samples = samples
        self.renderer = renderer
        self.shuffle_seed = shuffle_seed
        self.sample_seed = sample_seed
        self.shard, self.num_shards = shard, num_shards
        self.stop = stop
        self.max_prompt_tokens = max_prompt_tokens
        self.skip = skip
        self.render = render
        self._order: tuple[int, np.ndarray] | None = None

    @classmethod
    def from_config(cls, samples: Sequence, renderer, data: DataConfig, sample_seed: int | None, **kwargs):
        return cls(samples, renderer, shuffle_seed=data.seed if data.shuffle else None, sample_seed=sample_seed,
                   **kwargs)

    def sample_at(self, position: int):
        epoch, offset = divmod(position, len(self.samples))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(len(self.samples), self.shuffle_seed, epoch))
        return self.samples[int(self._order[1][offset])]

    def seed_at(self, position: int) -> int | None:
        return None if self.sample_seed is None else derive_seed(self.sample_seed, position)

    def request(self, position: int) -> PromptRequest:
        sample = self.sample_at(position)
        return build_request(self.renderer, sample, f"{sample.dataset_name}/{sample.dataset_index}@{position}",
                             seed=self.seed_at(position), position=position,
                             max_prompt_tokens=self.max_prompt_tokens, render=self.render)

    def first_position(self, start: int) -> int:
        """This shard's first position at or after `start`."""
        return start + (self.shard - start) % self.num_shards

    def requests(self, start: int = 0) -> Iterator[PromptRequest]:
        """This shard's requests from position `start` on, up to `stop` (forever without it)."""
        position = self.first_position(start)
        while self.stop is None or position < self.stop:
            if self.skip is None or not self.skip(position):
                yield self.request(position)
            position += self.num_shards
