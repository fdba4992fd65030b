"""The learner: a DeepSpeed engine around the policy, the frozen reference policy, log-probs of answers.

Both SFT and GRPO train through it:

    learner = Learner.build(cfg.model, cfg.optim, cfg.deepspeed, train_batch_size=16, total_steps=100)
    logp = learner.response_logprobs(micro)    # [B, L-1] log-probs of the answer tokens, 0 elsewhere
    learner.backward(loss); learner.step()

Log-probs come from the policy's final hidden states through `linear_token_logprobs` on the answer
rows only (`trainers/fused_head.py`): the [B, L, V] logits never exist. `fused_logprobs=False` (an
argument of `build`, or the attribute) takes the plain path instead: full logits, then `token_logprobs`.

Checkpoints, the Hugging Face export and the weight push read the parameters through
`full_parameters()`, which under ZeRO-3 gathers them a bucket at a time.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from medvl_engine.trainers.config import DeepSpeedConfig, ModelConfig, OptimConfig, deepspeed_config
from medvl_engine.trainers.distributed import device, init_distributed
from medvl_engine.trainers.model import DTYPES, freeze_vision, load_policy, load_tokenizer


@dataclass
class MicroBatch:
    """Right-padded sequences (prompt + answer) of one forward pass.

    `targets[:, t]` is the token at position t + 1 and `mask[:, t]` says whether it carries loss,
    so the logits at position t line up with `targets[:, t]`. `vision` holds what an image-text model
    needs besides the token ids (Qwen2.5-VL: `pixel_values` of every image of the rows, in row order,
    and `image_grid_thw`); empty for text.
    """

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64
    targets: torch.Tensor  # [B, L-1] int64
    mask: torch.Tensor  # [B, L-1] bool
    vision: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self):
        b, length = self.input_ids.shape
        if self.attention_mask.shape != (b, length):
            raise ValueError(f"MicroBatch: attention_mask {tuple(self.attention_mask.shape)} "
                             f"!= input_ids {(b, length)}")
        for name in ("targets", "mask"):
            if getattr(self, name).shape != (b, length - 1):
                raise ValueError(f"MicroBatch: {name} {tuple(getattr(self, name).shape)} != {(b, length - 1)}")

    def to(self, dev) -> MicroBatch:
        return MicroBatch(*(t.to(dev) for t in (self.input_ids, self.attention_mask, self.targets, self.mask)),
                          vision={k: v.to(dev) for k, v in self.vision.items()})

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model's forward for this micro-batch."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.vision}


def pad_sequences(sequences: list[list[int]], loss_starts: list[int], pad_id: int) -> MicroBatch:
    """Right-pad token lists; tokens from `loss_starts[i]` on (to the end of sequence i) carry loss."""
    if len(sequences) != len(loss_starts) or not sequences:
        raise ValueError(f"pad_sequences: {len(sequences)} sequences and {len(loss_starts)} loss starts")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(sequences), length), dtype=torch.long)
    mask = torch.zeros((len(sequences), length - 1), dtype=torch.bool)
    for i, (seq, start) in enumerate(zip(sequences, loss_starts)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"pad_sequences: sequence {i} of {len(seq)} tokens has loss start {start}")
        ids[i, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        mask[i, start - 1 : len(seq) - 1] = True
    return MicroBatch(ids, attn, ids[:, 1:].clone(), mask)


@dataclass
class Packed:
    """A micro-batch's sequences end to end in one row, without padding (`pack`): the model's inputs, the
    targets and mask laid out like them, and where each sequence sits (`unpack` maps values back)."""

    inputs: dict[str, torch.Tensor]
    targets: torch.Tensor  # [1, T-1]
    mask: torch.Tensor  # [1, T-1]
    offsets: list[int]
    lengths: list[int]


def pack(micro: MicroBatch, rope_index=None, merge_size: int = 2) -> Packed:
    """`micro`'s right-padded rows as one row of T = sum of their lengths: no attention, MLP or head work on
    padding. Position ids restart at 0 with every sequence and no attention mask is passed, so transformers
    masks attention block-diagonally (its packed-sequence detection; flash-attention's varlen path on CUDA,
    a [T, T] mask under SDPA or eager). An image-text model (`rope_index`: Qwen2-VL's `get_rope_index`;
    `merge_size`: its vision config's spatial_merge_size) gets its 3-D M-RoPE positions computed sequence by
    sequence, under a text row that restarts (the 4-row form Qwen2.5-VL reads as packed); its pixel rows keep
    their order. A sequence's last position predicts nothing
    (its next token is the next sequence's)."""
    lengths = micro.attention_mask.sum(1).tolist()
    offsets = [sum(lengths[:i]) for i in range(len(lengths))]
    total, dev = sum(lengths), micro.input_ids.device
    ids = torch.cat([micro.input_ids[i, :n] for i, n in enumerate(lengths)])[None]
    text_positions = torch.cat([torch.arange(n, device=dev) for n in lengths])[None]
    targets = torch.zeros(total, dtype=micro.targets.dtype, device=dev)
    mask = torch.zeros(total, dtype=torch.bool, device=dev)
    for i, (o, n) in enumerate(zip(offsets, lengths)):
        targets[o : o + n - 1] = micro.targets[i, : n - 1]
        mask[o : o + n - 1] = micro.mask[i, : n - 1]
    vision = dict(micro.vision)
    position_ids = text_positions
    if "mm_token_type_ids" in vision:
        types = vision["mm_token_type_ids"]
        vision["mm_token_type_ids"] = torch.cat([types[i, :n] for i, n in enumerate(lengths)])[None]
        if rope_index is not None:
            grids, first, rows = vision.get("image_grid_thw"), 0, []
            for i, n in enumerate(lengths):
                row = types[i, :n]
                # This sequence's images: the next grids whose merged patches cover its image tokens.
                images, tokens = 0, int(row.sum())
                while tokens > 0:
                    tokens -= int(grids[first + images].prod()) // merge_size**2
                    images += 1
                if images:
                    position, _ = rope_index(micro.input_ids[i : i + 1, :n], mm_token_type_ids=row[None],
                                             image_grid_thw=grids[first : first + images])
                else:  # a text sequence: the three rows are its plain positions
                    position = torch.arange(n, device=dev).view(1, 1, -1).expand(3, 1, n)
                rows.append(position.to(text_positions))
                first += images
            position_ids = torch.cat([text_positions[None], torch.cat(rows, -1)], 0)
    inputs = {"input_ids": ids, "position_ids": position_ids, **vision}
    return Packed(inputs, targets[:-1][None], mask[:-1][None], offsets, lengths)


def unpack(values: torch.Tensor, packed: Packed, shape: tuple[int, int]) -> torch.Tensor:
    """Per-position `values` [1, T-1] of a packed row back in the padded [B, L-1] layout (0 on padding)."""
    out, dev = values.new_zeros(shape), values.device
    rows = torch.cat([torch.full((n - 1,), i, device=dev) for i, n in enumerate(packed.lengths)])
    cols = torch.cat([torch.arange(n - 1, device=dev) for n in packed.lengths])
    src = torch.cat([torch.arange(o, o + n - 1, device=dev) for o, n in zip(packed.offsets, packed.lengths)])
    out[rows, cols] = values[0, src]
    return out


def _rope_index(model) -> tuple:
    """`(get_rope_index, spatial_merge_size)` of a Qwen2-VL-family model, `(None, 1)` for others."""
    module = getattr(model, "module", model)
    index = getattr(getattr(module, "model", None), "get_rope_index", None)
    merge = getattr(getattr(module.config, "vision_config", None), "spatial_merge_size", 1)
    return index, merge


class Learner:
    def __init__(self, engine, tokenizer, reference, model_cfg: ModelConfig, ds_cfg: DeepSpeedConfig,
                 rank: int, world_size: int, *, fused_logprobs: bool = True):
        self.engine = engine
        # True: the answers of a micro-batch go through the model end to end in one row, without padding
        # (`pack`); `model.packing` decides (auto: with a varlen attention kernel). Read at every call.
        self.packing = model_cfg is not None and model_cfg.packing_on
        # True: log-probs through the fused output head (needs `install_fused_head` on the policy and
        # the reference before they were wrapped); False: through the full logits. Read at every call.
        self.fused_logprobs = fused_logprobs
        self.tokenizer = tokenizer
        self.reference = reference
        self.model_cfg = model_cfg
        self.ds_cfg = ds_cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device()

    @classmethod
    def build(cls, model_cfg: ModelConfig, optim_cfg: OptimConfig, ds_cfg: DeepSpeedConfig, *,
              train_batch_size: int, total_steps: int, reference: bool = False,
              fused_logprobs: bool = True) -> Learner:
        """Load the policy, wrap it in DeepSpeed and, for a KL loss, keep a frozen copy of it.

        With `fused_logprobs` the policy's output projection becomes a `FusedLogprobHead` (same
        Parameter, a plain Linear outside the learner's log-prob calls) before DeepSpeed wraps it and
        before the reference is copied, so both compute log-probs without logits under every ZeRO stage.
        """
        import deepspeed

        from medvl_engine.trainers.fused_head import install_fused_head

        rank, world_size = init_distributed(ds_cfg.backend)
        tokenizer = load_tokenizer(model_cfg.path)
        # DeepSpeed casts to bf16/fp16 itself; loading in fp32 keeps its fp32 master weights exact.
        model = load_policy(model_cfg.path, "fp32", model_cfg.attn_implementation)
        freeze_vision(model, tower=model_cfg.freeze_vision, merger=model_cfg.freeze_merger)
        if fused_logprobs:
            install_fused_head(model)
        if model_cfg.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        ref = None
        if reference:
            ref = copy.deepcopy(model)
            # Parameters only, like DeepSpeed does to the policy: buffers keep their dtype. A bf16
            # rotary `inv_freq` in the reference against the policy's fp32 one moved log-probs by up to
            # 0.05 and the KL of the first step, with equal weights, by 0.003.
            for param in ref.parameters():
                param.data = param.data.to(DTYPES[model_cfg.dtype])
            ref.requires_grad_(False).eval()
        config = deepspeed_config(optim_cfg, ds_cfg, model_cfg.dtype, train_batch_size=train_batch_size,
                                  world_size=world_size, total_steps=total_steps)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad], config=config)
        if ref is not None:
            if ds_cfg.zero_stage == 3:
                # The reference is sharded like the policy instead of a full copy per rank.
                ref_config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
                ref, *_ = deepspeed.initialize(model=ref, config=ref_config)
            ref = ref.to(device())
        return cls(engine, tokenizer, ref, model_cfg, ds_cfg, rank, world_size, fused_logprobs=fused_logprobs)

    # -- forward ------------------------------------------------------------------------------------

    @functools.cached_property
    def processor(self):
        """The image-text policy's processor (expands image placeholders like the engine), None for text."""
        from medvl_engine.trainers.model import load_processor

        return load_processor(self.model_cfg.path)

    @property
    def module(self):
        return self.engine.module

    def logits(self, model, micro: MicroBatch) -> torch.Tensor:
        """The [B, L-1, V] logits of `micro` (the plain path; the fused path never builds them)."""
        out = model(**micro.model_inputs(), use_cache=False)
        return out.logits[:, :-1]

    def response_logprobs(self, micro: MicroBatch, *, temperature: float = 1.0, reference: bool = False,
                          return_entropy: bool = False):
        """Log-probs [B, L-1] of `micro.targets` under the policy (or the reference), float32, 0 off `micro.mask`.

        With `return_entropy`, `(logp, entropy)`: the entropy of each position's distribution, from
        the same pass. Both paths give the same numbers; the fused one only projects the masked rows
        onto the vocabulary.
        """
        model = self.reference if reference else self.engine
        if model is None:
            raise RuntimeError("response_logprobs(reference=True): the learner was built without a reference")
        if self.packing:
            packed = pack(micro, *_rope_index(model))
            out = self._logprobs_of(model, packed.inputs, packed.targets, packed.mask, temperature, return_entropy)
            shape = tuple(micro.targets.shape)
            if return_entropy:
                return unpack(out[0], packed, shape), unpack(out[1], packed, shape)
            return unpack(out, packed, shape)
        return self._logprobs_of(model, micro.model_inputs(), micro.targets, micro.mask, temperature, return_entropy)

    def _logprobs_of(self, model, inputs: dict[str, torch.Tensor], targets: torch.Tensor, mask: torch.Tensor,
                     temperature: float, return_entropy: bool):
        """Log-probs (and entropy) of `targets` where `mask`, from one forward of `model` on `inputs` (a padded
        micro-batch's, or a packed row's)."""
        if self.fused_logprobs:
            return self._fused_logprobs(model, inputs, targets, mask, temperature, return_entropy)
        from medvl_engine.kernels import token_logprobs

        logits = model(**inputs, use_cache=False).logits[:, :-1]
        tokens = targets.masked_fill(~mask, -1)  # negative: no log-prob, no gradient
        return token_logprobs(logits, tokens, temperature=temperature, return_entropy=return_entropy)

    @staticmethod
    def _fused_logprobs(model, inputs: dict[str, torch.Tensor], targets: torch.Tensor, mask: torch.Tensor,
                        temperature: float, return_entropy: bool):
        from medvl_engine.trainers.fused_head import fused_head

        head = fused_head(model)
        if head is None:
            raise RuntimeError("response_logprobs: fused_logprobs is on but the model's output projection is not a "
                               "FusedLogprobHead; call install_fused_head(model) before wrapping it (Learner.build "
                               "does), or set fused_logprobs=False")
        with head.logprobs(targets, mask, temperature=temperature, return_entropy=return_entropy):
            out = model(**inputs, use_cache=False).logits
        return (out[..., 0], out[..., 1]) if return_entropy else out[..., 0]

    # -- update ---------------------------------------------------------------------------------------

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    def grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # -- parameters -----------------------------------------------------------------------------------

    def full_parameters(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Buckets of (name, full tensor) of the policy, each at most `bucket_bytes` (one tensor may exceed).

        Under ZeRO-3 each bucket is gathered with one `GatheredParameters` call (not one call per
        parameter: hundreds of collectives instead of thousands for a 7B model); the tensors are
        cloned out of it, in the training dtype.
        """
        named = list(self.module.named_parameters())
        zero3 = self.ds_cfg.zero_stage == 3
        bucket: list[tuple[str, torch.nn.Parameter]] = []
        size = 0
        for name, param in named:
            numel = param.ds_numel if zero3 and hasattr(param, "ds_numel") else param.numel()
            nbytes = numel * param.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield self._gather(bucket, zero3)
                bucket, size = [], 0
            bucket.append((name, param))
            size += nbytes
        if bucket:
            yield self._gather(bucket, zero3)

    @staticmethod
    def _gather(bucket, zero3: bool) -> list[tuple[str, torch.Tensor]]:
        if not zero3:
            return [(name, p.detach()) for name, p in bucket]
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in bucket]):
            return [(name, p.detach().clone()) for name, p in bucket]

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The full policy weights (gathered under ZeRO-3), CPU tensors."""
        state = {}
        for bucket in self.full_parameters():
            for name, tensor in bucket:
                state[name] = tensor.to("cpu", copy=True)
        persistent = set(self.module.state_dict().keys())  # rotary inv_freq and the like are not saved
        for name, buf in self.module.named_buffers():
            if name in persistent:
                state.setdefault(name, buf.detach().cpu())
        return state
