"""Log-probs (and entropy) of the sampled tokens from logits: one pass over the vocabulary per row.

The forward reads each row of logits once with an online log-sum-exp in float32, loading bf16/fp16
blocks and widening them in registers, so no float32 copy of the [N, V] logits ever exists (with
Qwen2.5-VL's V = 151,936 and N = 16k tokens that copy would be 9.7 GB). The backward reads the row
once more and writes the gradient in the logits' dtype.

Rows whose token is negative (padding; Hugging Face's -100) are masked: log-prob and entropy are 0,
the gradient is 0 and the kernel does not read the row. A token >= V raises on CPU tensors and gives
NaN on CUDA tensors (checking it there would cost a host synchronisation).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from medvl_engine.kernels.dispatch import bf16_by_bits, block_size, launchable, resolve_impl
from medvl_engine.kernels.reference import token_logprobs_reference

LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _token_logprobs_fwd_kernel(logits_ptr, tokens_ptr, logp_ptr, entropy_ptr, lse_ptr,
                               rows_per_batch, stride_batch, stride_row, vocab, temperature,
                               RETURN_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // rows_per_batch) * stride_batch + (row % rows_per_batch) * stride_row
    token = tl.load(tokens_ptr + row).to(tl.int64)
    active = token >= 0
    # Running max m, sum s = sum exp(z - m) and w = sum exp(z - m) * (z - m): keeping w relative to m
    # avoids lse - E[z] cancelling when logits are large (|z| = 3e4 would cost 3e-3 of entropy in fp32).
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    w = tl.zeros((), tl.float32)
    for start in range(0, tl.where(active, vocab, 0), BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) / temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # A row of -inf so far would make exp(-inf - -inf) NaN; shift by 0 instead.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        shift = m - m_safe
        alpha = tl.exp(shift)
        e = tl.exp(z - m_safe)
        if RETURN_ENTROPY:
            w = alpha * (w + tl.where(s > 0, shift, 0.0) * s) + tl.sum(tl.where(e > 0, z - m_safe, 0.0) * e, axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
    s_safe = tl.where(s > 0, s, 1.0)
    lse = tl.where(active, tl.where(m == float("-inf"), 0.0, m) + tl.log(s_safe), 0.0)
    in_vocab = active & (token < vocab)
    z_token = tl.load(row_ptr + token, mask=in_vocab, other=0.0).to(tl.float32) / temperature
    logp = tl.where(in_vocab, z_token - lse, tl.where(active, float("nan"), 0.0))
    tl.store(logp_ptr + row, logp)
    tl.store(lse_ptr + row, lse)
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(active, tl.log(s_safe) - w / s_safe, 0.0))


@triton.jit
def _grad_of_logits(z, lse, is_token, active, g_logp, g_entropy, entropy, temperature, out_dtype: tl.constexpr,
                    HAS_GRAD_ENTROPY: tl.constexpr, BF16_RNE: tl.constexpr):
    """Gradient w.r.t. one block of logits (z = logits / temperature, float32), cast to the logits' dtype;
    shared by the backward of token_logprobs and of linear_token_logprobs."""
    log_q = z - lse
    p = tl.exp(log_q)
    # d logp / dz_j = [j == token] - p_j ; d entropy / dz_j = -p_j (log p_j + entropy)
    dz = g_logp * (tl.where(is_token, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        dz -= g_entropy * p * tl.where(p > 0, log_q + entropy, 0.0)
    dz = tl.where(active, dz / temperature, 0.0)
    if BF16_RNE:
        # The CPU interpreter truncates float32 -> bf16; round to nearest even with integer arithmetic.
        bits = dz.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return dz.to(out_dtype)


@triton.jit
def _token_logprobs_bwd_kernel(logits_ptr, tokens_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
                               grad_ptr, rows_per_batch, stride_batch, stride_row, vocab, temperature,
                               HAS_GRAD_LOGP: tl.constexpr, HAS_GRAD_ENTROPY: tl.constexpr, BF16_RNE: tl.constexpr,
                               BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + (row // rows_per_batch) * stride_batch + (row % rows_per_batch) * stride_row
    grad_row_ptr = grad_ptr + row * vocab
    token = tl.load(tokens_ptr + row).to(tl.int64)
    active = token >= 0
    limit = tl.where(active, vocab, 0)
    lse = tl.load(lse_ptr + row)
    g_logp = 0.0
    g_entropy = 0.0
    entropy = 0.0
    if HAS_GRAD_LOGP:
        g_logp = tl.load(grad_logp_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < vocab
        z = tl.load(row_ptr + cols, mask=cols < limit, other=float("-inf")).to(tl.float32) / temperature
        out = _grad_of_logits(z, lse, cols == token, active, g_logp, g_entropy, entropy, temperature,
                              grad_ptr.dtype.element_ty, HAS_GRAD_ENTROPY, BF16_RNE)
        tl.store(grad_row_ptr + cols, out, mask=in_row)


def _row_layout(logits: torch.Tensor) -> tuple[int, int, int]:
    """(rows per batch, batch stride, row stride): addresses row n of a [N, V] or [B, T, V] view."""
    if logits.dim() == 2:
        return max(logits.shape[0], 1), 0, logits.stride(0)
    return max(logits.shape[1], 1), logits.stride(0), logits.stride(1)


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def token_logprobs_forward(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                           return_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Launch the forward kernel: (logp [N], entropy [N] or None, lse [N]) in float32, N = rows."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    vocab = logits.shape[-1]
    rows = tokens.numel()
    flat_tokens = tokens.reshape(-1)
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if return_entropy else None
    if rows == 0:
        return logp, entropy, lse
    block = block_size(vocab, logits.device, gpu_max=4096)
    kernel = launchable(_token_logprobs_fwd_kernel, logits.device)
    kernel[(rows,)](logits, flat_tokens, logp, entropy if return_entropy else logp, lse, *_row_layout(logits),
                    vocab, float(temperature), RETURN_ENTROPY=return_entropy, BLOCK_V=block,
                    num_warps=_num_warps(block))
    return logp, entropy, lse


def token_logprobs_backward(logits: torch.Tensor, tokens: torch.Tensor, lse: torch.Tensor,
                            entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                            grad_entropy: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Launch the backward kernel: the gradient w.r.t. `logits`, contiguous, in the logits' dtype."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    vocab = logits.shape[-1]
    rows = tokens.numel()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if rows == 0:
        return grad
    if grad_logp is None and grad_entropy is None:
        return grad.zero_()
    grad_logp = None if grad_logp is None else grad_logp.reshape(-1).float().contiguous()
    grad_entropy = None if grad_entropy is None else grad_entropy.reshape(-1).float().contiguous()
    block = block_size(vocab, logits.device, gpu_max=4096)
    kernel = launchable(_token_logprobs_bwd_kernel, logits.device)
    kernel[(rows,)](logits, tokens.reshape(-1), lse, entropy if entropy is not None else lse,
                    grad_logp if grad_logp is not None else lse, grad_entropy if grad_entropy is not None else lse,
                    grad, *_row_layout(logits), vocab, float(temperature),
                    HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
                    BF16_RNE=bf16_by_bits(grad.dtype, grad.device), BLOCK_V=block, num_warps=_num_warps(block))
    return grad


class TokenLogprobs(torch.autograd.Function):
    """Autograd wrapper: outputs (logp, entropy); entropy is an empty, non-differentiable tensor unless asked."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, return_entropy):
        logp, entropy, lse = token_logprobs_forward(logits, tokens, temperature, return_entropy)
        ctx.save_for_backward(logits, tokens, lse, entropy if return_entropy else lse)
        ctx.temperature = temperature
        ctx.return_entropy = return_entropy
        shape = tokens.shape
        if not return_entropy:
            entropy = logp.new_empty(0)
            ctx.mark_non_differentiable(entropy)
            return logp.view(shape), entropy
        return logp.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, tokens, lse, entropy = ctx.saved_tensors
        if not ctx.return_entropy:
            grad_entropy, entropy = None, None
        grad = token_logprobs_backward(logits, tokens, lse, entropy, grad_logp, grad_entropy, ctx.temperature)
        return grad, None, None, None


def check_token_inputs(op: str, tokens: torch.Tensor, leading_shape: torch.Size, vocab: int,
                       temperature: float) -> None:
    """Shape, dtype, range and temperature checks shared by token_logprobs and linear_token_logprobs."""
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{op}: tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.shape != leading_shape:
        raise ValueError(f"{op}: tokens has shape {tuple(tokens.shape)}, expected {tuple(leading_shape)}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature!r}")
    # Only on CPU: a range check on a CUDA tensor would synchronise with the host on every call.
    if tokens.device.type == "cpu" and tokens.numel() and int(tokens.max()) >= vocab:
        bad = int(torch.nonzero(tokens.reshape(-1) >= vocab)[0])
        raise ValueError(f"{op}: token {int(tokens.reshape(-1)[bad])} at flat position {bad} is >= vocabulary "
                         f"size {vocab}")


def check_float_dtype(op: str, name: str, dtype: torch.dtype, impl: str) -> None:
    """bf16/fp16/fp32 on both paths; fp64 (gradcheck) on the reference only."""
    if dtype in LOGIT_DTYPES or (dtype == torch.float64 and impl == "torch"):
        return
    hint = " (float64 runs on the reference: pass impl='torch')" if dtype == torch.float64 else ""
    raise TypeError(f"{op}: {name} dtype {dtype} is not one of bf16, fp16, fp32{hint}")


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, *, impl: str = "auto"):
    """Log-prob of each row's token under `softmax(logits / temperature)`, and optionally the row's entropy.

    logits: [N, V] or [B, T, V] in bf16, fp16 or fp32 (rows may be a strided view, e.g. `logits[:, :-1]`);
    tokens: [N] or [B, T] integers, negative = masked row. Returns float32 tensors shaped like `tokens`:
    `logp`, or `(logp, entropy)` when `return_entropy`. Differentiable w.r.t. `logits`.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"token_logprobs: logits must be a [N, V] or [B, T, V] tensor, got "
                         f"{getattr(logits, 'shape', type(logits))}")
    check_token_inputs("token_logprobs", tokens, logits.shape[:-1], logits.shape[-1], temperature)
    impl = resolve_impl(impl, logits, tokens, op="token_logprobs")
    check_float_dtype("token_logprobs", "logits", logits.dtype, impl)
    if impl == "torch":
        return token_logprobs_reference(logits, tokens, temperature, return_entropy)
    logp, entropy = TokenLogprobs.apply(logits, tokens, float(temperature), bool(return_entropy))
    return (logp, entropy) if return_entropy else logp
