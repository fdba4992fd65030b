"""Token log-probs straight from hidden states and the output projection, never holding [N, V] logits.

The op walks [chunk x chunk] tiles of the logits: each tile is one matmul (cuBLAS on a GPU), then a
Triton kernel folds it into per-row running max, sum and entropy accumulators. The backward
recomputes each tile, turns it in place into the gradient w.r.t. the logits, and multiplies it into
the gradients of `hidden` and `weight` (the approach of fused linear cross-entropy kernels). Extra
memory is one tile plus float32 accumulators for grad_hidden [N, H] and one chunk of grad_weight:
at N = 16k, V = 151,936, H = 3,584 and chunk 4,096 that is ~0.3 GB, against 5 GB of bf16 logits
(and 10 GB more for their float32 copy) on the naive path.

Rows whose token is negative are masked as in `token_logprobs`: log-prob and entropy 0, no gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from medvl_engine.kernels.dispatch import bf16_by_bits, block_size, launchable, resolve_impl
from medvl_engine.kernels.reference import linear_token_logprobs_reference
from medvl_engine.kernels.token_logprobs import _grad_of_logits, check_float_dtype, check_token_inputs

DEFAULT_CHUNK = 4096


@triton.jit
def _linear_token_logprobs_fwd_kernel(tile_ptr, tile_stride, tile_cols, vocab_start, tokens_ptr, row_start,
                                      max_ptr, sum_ptr, wsum_ptr, z_token_ptr, temperature,
                                      BLOCK_V: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = row_start + i
    tile_row = tile_ptr + i * tile_stride
    token = tl.load(tokens_ptr + row).to(tl.int64)
    active = token >= 0
    # The same relative online update as _token_logprobs_fwd_kernel, resumed from this row's state.
    m = tl.load(max_ptr + row)
    s = tl.load(sum_ptr + row)
    w = tl.load(wsum_ptr + row)
    for start in range(0, tl.where(active, tile_cols, 0), BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(tile_row + cols, mask=cols < tile_cols, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = m - m_safe
        alpha = tl.exp(shift)
        e = tl.exp(z - m_safe)
        w = alpha * (w + tl.where(s > 0, shift, 0.0) * s) + tl.sum(tl.where(e > 0, z - m_safe, 0.0) * e, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(sum_ptr + row, s)
    tl.store(wsum_ptr + row, w)
    local = token - vocab_start
    hit = active & (local >= 0) & (local < tile_cols)
    z_token = tl.load(tile_row + local, mask=hit, other=0.0).to(tl.float32) / temperature
    tl.store(z_token_ptr + row, z_token, mask=hit)


@triton.jit
def _linear_token_logprobs_bwd_kernel(tile_ptr, tile_stride, tile_cols, vocab_start, tokens_ptr, row_start,
                                      lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr, temperature,
                                      HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr,
                                      BF16_RNE: tl.constexpr, BLOCK_V: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    row = row_start + i
    tile_row = tile_ptr + i * tile_stride
    token = tl.load(tokens_ptr + row).to(tl.int64)
    active = token >= 0
    limit = tl.where(active, tile_cols, 0)
    local = token - vocab_start
    lse = tl.load(lse_ptr + row)
    g_logp = 0.0
    g_entropy = 0.0
    entropy = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, tile_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(tile_row + cols, mask=cols < limit, other=float("-inf")).to(tl.float32) / temperature
        out = _grad_of_logits(z, lse, cols == local, active, g_logp, g_entropy, entropy, temperature,
                              tile_ptr.dtype.element_ty, HAS_GRAD_ENTROPY, BF16_RNE)
        # In place: each element is read and then overwritten by the same program.
        tl.store(tile_row + cols, out, mask=cols < tile_cols)


def _tiles(size: int, chunk: int):
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def linear_token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                                  temperature: float, chunk: int, return_entropy: bool):
    """hidden [N, H], weight [V, H], tokens [N] -> (logp [N], entropy [N] or None, lse [N]), float32."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    running_max = torch.full((rows,), -torch.inf, dtype=torch.float32, device=device)
    running_sum = torch.zeros(rows, dtype=torch.float32, device=device)
    running_wsum = torch.zeros(rows, dtype=torch.float32, device=device)
    z_token = torch.full((rows,), torch.nan, dtype=torch.float32, device=device)
    kernel = launchable(_linear_token_logprobs_fwd_kernel, device)
    for r0, r1 in _tiles(rows, chunk):
        for v0, v1 in _tiles(vocab, chunk):
            tile = hidden[r0:r1] @ weight[v0:v1].T
            block = block_size(v1 - v0, device, gpu_max=4096)
            kernel[(r1 - r0,)](tile, tile.stride(0), v1 - v0, v0, tokens, r0, running_max, running_sum,
                               running_wsum, z_token, float(temperature), BLOCK_V=block,
                               num_warps=8 if block >= 2048 else 4)
    active = tokens >= 0
    safe_sum = torch.where(running_sum > 0, running_sum, 1.0)
    lse = torch.where(active, torch.where(running_max == -torch.inf, 0.0, running_max) + safe_sum.log(), 0.0)
    logp = torch.where(active, z_token - lse, 0.0)
    entropy = torch.where(active, safe_sum.log() - running_wsum / safe_sum, 0.0) if return_entropy else None
    return logp, entropy, lse


def linear_token_logprobs_backward(hidden, weight, tokens, lse, entropy, grad_logp, grad_entropy, temperature,
                                   chunk, need_hidden, need_weight):
    """Gradients (hidden, weight) of the forward, recomputing each logits tile; None where not needed."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    # float32 accumulators: the sum over vocabulary tiles would lose ~3 bits per doubling in bf16.
    grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    grad_logp = None if grad_logp is None else grad_logp.reshape(-1).float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous()
    kernel = launchable(_linear_token_logprobs_bwd_kernel, device)
    for v0, v1 in _tiles(vocab, chunk):
        w_tile = weight[v0:v1]
        grad_w_tile = torch.zeros(w_tile.shape, dtype=torch.float32, device=device) if need_weight else None
        for r0, r1 in _tiles(rows, chunk):
            h_tile = hidden[r0:r1]
            tile = h_tile @ w_tile.T
            block = block_size(v1 - v0, device, gpu_max=4096)
            kernel[(r1 - r0,)](tile, tile.stride(0), v1 - v0, v0, tokens, r0, lse,
                               entropy if entropy is not None else lse,
                               grad_logp if grad_logp is not None else lse,
                               grad_entropy if grad_entropy is not None else lse, float(temperature),
                               HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
                               BF16_RNE=bf16_by_bits(tile.dtype, device), BLOCK_V=block,
                               num_warps=8 if block >= 2048 else 4)
            if need_hidden:
                grad_hidden[r0:r1] += tile @ w_tile
            if need_weight:
                grad_w_tile += tile.T @ h_tile
        if need_weight:
            grad_weight[v0:v1] = grad_w_tile
    return (grad_hidden.to(hidden.dtype) if need_hidden else None), grad_weight


class LinearTokenLogprobs(torch.autograd.Function):
    """Autograd wrapper over [N, H] hidden states; outputs (logp, entropy) like TokenLogprobs."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, return_entropy):
        logp, entropy, lse = linear_token_logprobs_forward(hidden, weight, tokens, temperature, chunk,
                                                           return_entropy)
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy if return_entropy else lse)
        ctx.temperature, ctx.chunk, ctx.return_entropy = temperature, chunk, return_entropy
        if not return_entropy:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        if not ctx.return_entropy:
            grad_entropy, entropy = None, None
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logp is None and grad_entropy is None:
            return (torch.zeros_like(hidden) if need_hidden else None,
                    torch.zeros_like(weight) if need_weight else None, None, None, None, None)
        grad_hidden, grad_weight = linear_token_logprobs_backward(
            hidden, weight, tokens, lse, entropy, grad_logp, grad_entropy, ctx.temperature, ctx.chunk,
            need_hidden, need_weight)
        return grad_hidden, grad_weight, None, None, None, None


def linear_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                          temperature: float = 1.0, chunk: int = DEFAULT_CHUNK, return_entropy: bool = False, *,
                          impl: str = "auto"):
    """`token_logprobs(hidden @ weight.T, tokens, temperature)` without materialising the logits.

    hidden: [N, H] or [B, T, H]; weight: [V, H] (the output projection, same dtype); tokens: [N] or
    [B, T], negative = masked row. `chunk` bounds both sides of the logits tile the op holds at a time
    (rows x vocabulary). Returns float32 `logp` shaped like `tokens` (and `entropy` when asked);
    differentiable w.r.t. `hidden` and `weight`. The "torch" path is the naive full-logits reference.
    """
    op = "linear_token_logprobs"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3):
        raise ValueError(f"{op}: hidden must be a [N, H] or [B, T, H] tensor, got "
                         f"{getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{op}: weight must be [V, H] with H = {hidden.shape[-1]} (hidden's last dim), got "
                         f"{getattr(weight, 'shape', type(weight))}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{op}: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one dtype")
    if not isinstance(chunk, int) or chunk < 16:
        raise ValueError(f"{op}: chunk must be an int >= 16, got {chunk!r}")
    check_token_inputs(op, tokens, hidden.shape[:-1], weight.shape[0], temperature)
    impl = resolve_impl(impl, hidden, weight, tokens, op=op)
    check_float_dtype(op, "hidden", hidden.dtype, impl)
    if impl == "torch":
        return linear_token_logprobs_reference(hidden, weight, tokens, temperature, return_entropy)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_tokens = tokens.reshape(-1).contiguous()
    logp, entropy = LinearTokenLogprobs.apply(flat_hidden, weight, flat_tokens, float(temperature), chunk,
                                              bool(return_entropy))
    if return_entropy:
        return logp.view(tokens.shape), entropy.view(tokens.shape)
    return logp.view(tokens.shape)
