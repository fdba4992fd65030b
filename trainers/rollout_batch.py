"""One GRPO step's rollout groups, flattened to sequences and cut into this rank's micro-batches.

Groups with images (an image-text policy): each prompt's image placeholders are expanded with the
policy's processor exactly as the engine expanded them (`medvl_engine.vision.expand_image_tokens`), once
per group, and every micro-batch carries the `pixel_values` and `image_grid_thw` of its rows. Images for
a text-only policy are an error, never silently dropped.

Sequence i is prompt + answer i of its group; `group_index[i]` names the group, so advantages come
from `group_advantages(rewards, group_index)` over the whole step on every rank. The mini-batches
(one optimizer step each) are contiguous runs of whole groups; each is split evenly over the ranks
and then into micro-batches of `micro_batch_size` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from medvl_engine.errors import ConfigError
from medvl_engine.trainers.learner import MicroBatch, pad_sequences
from medvl_engine.transport.messages import RolloutGroup


@dataclass
class RolloutBatch:
    sequences: list[np.ndarray]  # int32 prompt + answer tokens, one per answer
    prompt_lengths: list[int]
    engine_logprobs: list[np.ndarray | None]  # the engine's log-probs of the answer tokens
    rewards: torch.Tensor  # [M] float32
    group_index: torch.Tensor  # [M] int64, 0..G-1 in group order
    correct: torch.Tensor  # [M] bool
    format_ok: torch.Tensor  # [M] bool
    weight_versions: torch.Tensor  # [M] int64, the policy version that sampled each answer
    num_groups: int
    vision: list[dict] = field(default_factory=list)  # per sequence: its prompt's vision inputs ({} for text)
    num_images: int = 0
    image_token: int | None = None  # the processor's image placeholder id

    @classmethod
    def from_groups(cls, groups: list[RolloutGroup], *, max_prompt_tokens: int, max_response_tokens: int,
                    processor=None) -> RolloutBatch:
        from medvl_engine.vision import expand_image_tokens, image_token_id

        if not groups:
            raise ValueError("RolloutBatch.from_groups: no groups")
        sequences, prompt_lengths, engine_lp, versions, group_index, vision = [], [], [], [], [], []
        rewards, correct, format_ok = [], [], []
        num_images = 0
        for g, group in enumerate(groups):
            prompt = group.prompt_array()
            group_vision: dict = {}
            if group.images:
                if processor is None:
                    raise ConfigError(f"group {group.prompt_id!r} has {len(group.images)} image(s) but the policy is a "
                                      "text-only model: train an image-text model, or set --data.text-only or "
                                      "--data.ignore-images")
                try:
                    ids, group_vision = expand_image_tokens(prompt.tolist(), group.image_list(), processor)
                except ValueError as exc:
                    raise ValueError(f"group {group.prompt_id!r}: {exc}") from None
                prompt = np.asarray(ids, dtype=np.int32)
                num_images += len(group.images)
            if prompt.size > max_prompt_tokens:
                raise ConfigError(f"group {group.prompt_id!r}: prompt of {prompt.size} tokens > "
                                  f"rollout.max_prompt_tokens {max_prompt_tokens}")
            if group.n == 0:
                raise ValueError(f"group {group.prompt_id!r}: no answers")
            for i in range(group.n):
                response = group.response_array(i)
                if response.size == 0:
                    raise ValueError(f"group {group.prompt_id!r} answer {i}: empty (the engine must return "
                                     "at least the end-of-sequence token)")
                if response.size > max_response_tokens:
                    raise ValueError(f"group {group.prompt_id!r} answer {i}: {response.size} tokens > "
                                     f"rollout.max_response_tokens {max_response_tokens}")
                lp = group.logprob_array(i)
                if lp is not None and lp.size != response.size:
                    raise ValueError(f"group {group.prompt_id!r} answer {i}: {lp.size} log-probs for "
                                     f"{response.size} tokens")
                sequences.append(np.concatenate([prompt, response]))
                prompt_lengths.append(int(prompt.size))
                engine_lp.append(lp)
                versions.append(group.weight_version)
                group_index.append(g)
                vision.append(group_vision)
            rewards.append(group.reward_array())
            correct.append(group.correct_array())
            format_ok.append(group.format_array())
        return cls(sequences, prompt_lengths, engine_lp,
                   torch.from_numpy(np.concatenate(rewards).astype(np.float32)),
                   torch.tensor(group_index, dtype=torch.long),
                   torch.from_numpy(np.concatenate(correct).astype(bool)),
                   torch.from_numpy(np.concatenate(format_ok).astype(bool)),
                   torch.tensor(versions, dtype=torch.long), len(groups), vision, num_images,
                   image_token_id(processor) if num_images else None)

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def response_lengths(self) -> torch.Tensor:
        return torch.tensor([s.size - p for s, p in zip(self.sequences, self.prompt_lengths)], dtype=torch.long)

    def mini_batches(self, count: int) -> list[np.ndarray]:
        """`count` runs of whole groups (sequence indices), in group order."""
        if self.num_groups % count:
            raise ValueError(f"{self.num_groups} groups do not split into {count} mini-batches")
        per = self.num_groups // count
        gi = self.group_index.numpy()
        return [np.nonzero((gi >= k * per) & (gi < (k + 1) * per))[0] for k in range(count)]

    def shard(self, indices: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        if len(indices) % world_size:
            raise ConfigError(f"a mini-batch of {len(indices)} answers does not split over {world_size} ranks "
                              "(make groups per mini-batch x n a multiple of the number of ranks)")
        per = len(indices) // world_size
        return indices[rank * per : (rank + 1) * per]

    def micro_batch(self, indices: np.ndarray, pad_id: int) -> MicroBatch:
        from medvl_engine.vision import batch_vision

        micro = pad_sequences([self.sequences[i].tolist() for i in indices],
                              [self.prompt_lengths[i] for i in indices], pad_id)
        micro.vision = batch_vision([self.vision[i] for i in indices], micro.input_ids, self.image_token)
        return micro

    def engine_logprob_tensor(self, indices: np.ndarray, micro: MicroBatch) -> torch.Tensor | None:
        """The engine's log-probs laid out like `micro.targets` (0 off the answer), or None if any is missing."""
        out = torch.zeros(micro.targets.shape, dtype=torch.float32)
        for row, i in enumerate(indices):
            lp = self.engine_logprobs[i]
            if lp is None:
                return None
            start = self.prompt_lengths[i] - 1
            out[row, start : start + lp.size] = torch.from_numpy(lp.copy())
        return out
