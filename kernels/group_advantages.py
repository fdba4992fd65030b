"""Group-relative advantages (GRPO, Dr. GRPO, RLOO) over groups of any size in any order.

Three launches over the M rewards, each one program per block of samples, and no host
synchronisation: (1) per-group count, sum, max and min by atomics into buffers indexed by group id,
(2) for GRPO, the sum of squared deviations from the group mean (two passes, so the unbiased std does
not suffer the cancellation of E[r^2] - E[r]^2), (3) each sample's advantage and its group's
`constant` flag. Group ids must lie in [0, M) (any M distinct ids fit); float atomics make the
summation order, and so the last bit of a mean, vary between GPU runs.

Conventions (verl's): a group of one sample has mean 0 and std 1, so its GRPO advantage is
r / (1 + eps) and its Dr. GRPO and RLOO advantages are r. A group whose rewards are all equal (size
> 1) gets advantage exactly 0; `constant` is True for it and for groups of one (no learning signal).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medvl_engine.kernels.dispatch import block_size, launchable, resolve_impl
from medvl_engine.kernels.reference import ADVANTAGE_MODES, group_advantages_reference

_MODE_CODES = {"grpo": 0, "drgrpo": 1, "rloo": 2}


@triton.jit
def _group_advantages_stats_kernel(rewards_ptr, index_ptr, count_ptr, sum_ptr, max_ptr, min_ptr, size,
                                   BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < size
    r = tl.load(rewards_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(index_ptr + offsets, mask=valid, other=0).to(tl.int64)
    tl.atomic_add(count_ptr + g, tl.full([BLOCK], 1, tl.int32), mask=valid)
    tl.atomic_add(sum_ptr + g, r, mask=valid)
    tl.atomic_max(max_ptr + g, r, mask=valid)
    tl.atomic_min(min_ptr + g, r, mask=valid)


@triton.jit
def _group_advantages_squares_kernel(rewards_ptr, index_ptr, count_ptr, sum_ptr, squares_ptr, size,
                                     BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < size
    r = tl.load(rewards_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(index_ptr + offsets, mask=valid, other=0).to(tl.int64)
    n = tl.load(count_ptr + g, mask=valid, other=1).to(tl.float32)
    d = r - tl.load(sum_ptr + g, mask=valid, other=0.0) / n
    tl.atomic_add(squares_ptr + g, d * d, mask=valid)


@triton.jit
def _group_advantages_kernel(rewards_ptr, index_ptr, count_ptr, sum_ptr, max_ptr, min_ptr, squares_ptr,
                             advantages_ptr, constant_ptr, size, eps, MODE: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offsets < size
    r = tl.load(rewards_ptr + offsets, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(index_ptr + offsets, mask=valid, other=0).to(tl.int64)
    count = tl.load(count_ptr + g, mask=valid, other=1)
    n = count.to(tl.float32)
    centred = r - tl.load(sum_ptr + g, mask=valid, other=0.0) / n
    single = count == 1
    # max == min is exact, unlike std == 0 after rounding.
    constant = tl.load(max_ptr + g, mask=valid, other=0.0) == tl.load(min_ptr + g, mask=valid, other=0.0)
    # n - 1 is 0 for groups of one; their lanes take the other branch, the divisor only has to be finite.
    others = tl.where(single, 1.0, n - 1.0)
    if MODE == 0:
        std = tl.sqrt(tl.load(squares_ptr + g, mask=valid, other=0.0) / others)
        adv = tl.where(single, r / (1.0 + eps), centred / (std + eps))
    elif MODE == 1:
        adv = tl.where(single, r, centred)
    else:
        adv = tl.where(single, r, centred * (n / others))
    adv = tl.where(constant & (count > 1), 0.0, adv)
    tl.store(advantages_ptr + offsets, adv, mask=valid)
    tl.store(constant_ptr + offsets, constant, mask=valid)


def group_advantages_forward(rewards: torch.Tensor, group_index: torch.Tensor, mode: str,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the three kernels over contiguous [M] rewards and group ids."""
    size = rewards.numel()
    device = rewards.device
    advantages = torch.empty(size, dtype=torch.float32, device=device)
    constant = torch.empty(size, dtype=torch.bool, device=device)
    if size == 0:
        return advantages, constant
    rewards, group_index = rewards.contiguous(), group_index.contiguous()
    count = torch.zeros(size, dtype=torch.int32, device=device)
    sums = torch.zeros(size, dtype=torch.float32, device=device)
    high = torch.full((size,), -torch.inf, dtype=torch.float32, device=device)
    low = torch.full((size,), torch.inf, dtype=torch.float32, device=device)
    squares = torch.zeros(size, dtype=torch.float32, device=device) if mode == "grpo" else sums
    block = block_size(size, device, gpu_max=1024, cpu_max=65536)
    grid = (triton.cdiv(size, block),)
    launchable(_group_advantages_stats_kernel, device)[grid](rewards, group_index, count, sums, high, low, size,
                                                               BLOCK=block)
    if mode == "grpo":
        launchable(_group_advantages_squares_kernel, device)[grid](rewards, group_index, count, sums, squares,
                                                                     size, BLOCK=block)
    launchable(_group_advantages_kernel, device)[grid](rewards, group_index, count, sums, high, low, squares,
                                                         advantages, constant, size, float(eps),
                                                         MODE=_MODE_CODES[mode], BLOCK=block)
    return advantages, constant


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, mode: str = "grpo", eps: float = 1e-6, *,
                     impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages of M samples from their rewards and group ids, and which groups are constant.

    rewards: [M] float; group_index: [M] integer ids in [0, M), groups of any size in any order.
    mode: "grpo" `(r - mean_g) / (std_g + eps)` with the unbiased std, "drgrpo" `r - mean_g`, "rloo"
    `r - mean of the other samples of g`. Returns `(advantages [M] float32, constant [M] bool)`.
    Not differentiable (rewards are data).
    """
    op = "group_advantages"
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"{op}: mode={mode!r} is not one of {ADVANTAGE_MODES}")
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise ValueError(f"{op}: rewards must be a 1-D float tensor, got "
                         f"{getattr(rewards, 'dtype', type(rewards))} {tuple(getattr(rewards, 'shape', ()))}")
    if not isinstance(group_index, torch.Tensor) or group_index.dtype.is_floating_point or group_index.dtype in (
            torch.bool, torch.complex64, torch.complex128):
        raise TypeError(f"{op}: group_index must be an integer tensor, got {getattr(group_index, 'dtype', None)}")
    if group_index.shape != rewards.shape:
        raise ValueError(f"{op}: group_index has shape {tuple(group_index.shape)}, rewards {tuple(rewards.shape)}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps!r}")
    size = rewards.numel()
    # Only on CPU: on CUDA the check would synchronise with the host.
    if group_index.device.type == "cpu" and size:
        bad = torch.nonzero((group_index < 0) | (group_index >= size))
        if bad.numel():
            at = int(bad[0])
            raise ValueError(f"{op}: group_index[{at}] = {int(group_index[at])} is outside [0, {size}) "
                             f"(ids must be < the number of samples; renumber them, e.g. with torch.unique)")
    impl = resolve_impl(impl, rewards, group_index, op=op)
    if impl == "torch":
        advantages, constant = group_advantages_reference(rewards.detach(), group_index, mode, eps)
        return advantages.float(), constant
    return group_advantages_forward(rewards.detach(), group_index, mode, eps)
