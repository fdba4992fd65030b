"""The PPO clipped policy loss (with dual-clip) and a KL penalty, forward and backward in one read of the inputs.

One program per (sequence, block of tokens) reads logp, old_logp, advantages, mask (and ref_logp)
once, and writes the derivative of each token's loss w.r.t. logp (float32 [B, T]) plus seven partial
sums per block: loss, mask weight, clipped tokens, dual-clipped tokens, ratio, k1 and KL. A few
[B]-sized tensor ops turn the partial sums into the aggregated loss and the metrics, with no host
synchronisation, and the backward is one elementwise pass that scales the stored derivative by each
sequence's aggregation weight. Definitions (clip-higher, dual-clip, the +-20 and +-10 clamps of
low_var_kl, verl's agg_loss modes, GSPO's sequence ratio) are those of `reference.policy_loss_reference`.

GSPO (`loss="gspo"`) needs each sequence's mean log-ratio before any token's loss: a first kernel
reads logp, old_logp and mask once more and writes two partial sums per block (masked log-ratio,
mask weight), a [B] division turns them into the sequence log-ratios, and the forward kernel, compiled
with SEQ_RATIO, uses that one ratio on every token of the sequence (its gradient stays the token's own,
verl's stop-gradient form).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from medvl_engine.kernels.dispatch import bf16_by_bits, block_size, launchable, resolve_impl
from medvl_engine.kernels.reference import (
    AGG_MODES,
    DUAL_CLIP_RATIO,
    KL_TYPES,
    LOSS_MODES,
    MASKED_MEAN_EPS,
    dual_clip_enabled,
    policy_loss_reference,
)

_KL_CODES = {"low_var_kl": 0, "k1": 1, "k2": 2}
_SUMS = 7  # loss, mask weight, clipped, dual-clipped, ratio, k1 (old - new), kl
METRIC_NAMES = ("clip_frac", "dual_clip_frac", "ratio_mean", "approx_kl", "kl")


@triton.jit
def _policy_loss_seq_kernel(logp_ptr, old_ptr, mask_ptr, partial_ptr, seq_len, s_logp_b, s_logp_t, s_old_b, s_old_t,
                            s_mask_b, s_mask_t, BLOCK_T: tl.constexpr):
    """GSPO's first pass: per (sequence, block) the masked sum of logp - old_logp and of the mask."""
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < seq_len
    logp = tl.load(logp_ptr + b * s_logp_b + t * s_logp_t, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + b * s_old_b + t * s_old_t, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(mask_ptr + b * s_mask_b + t * s_mask_t, mask=valid, other=0).to(tl.float32)
    out = partial_ptr + (b * tl.num_programs(1) + blk) * 2
    tl.store(out + 0, tl.sum(tl.where(weight != 0, (logp - old) * weight, 0.0), axis=0))
    tl.store(out + 1, tl.sum(weight, axis=0))


@triton.jit
def _policy_loss_fwd_kernel(logp_ptr, old_ptr, adv_ptr, mask_ptr, ref_ptr, seq_ratio_ptr, dloss_ptr, partial_ptr,
                            seq_len, s_logp_b, s_logp_t, s_old_b, s_old_t, s_adv_b, s_adv_t, s_mask_b, s_mask_t,
                            s_ref_b, s_ref_t, clip_low, clip_high, clip_ratio_c, kl_coef,
                            DUAL_CLIP: tl.constexpr, HAS_REF: tl.constexpr, KL_TYPE: tl.constexpr,
                            SEQ_RATIO: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    t = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < seq_len
    logp = tl.load(logp_ptr + b * s_logp_b + t * s_logp_t, mask=valid, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + b * s_old_b + t * s_old_t, mask=valid, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + b * s_adv_b + t * s_adv_t, mask=valid, other=0.0).to(tl.float32)
    weight = tl.load(mask_ptr + b * s_mask_b + t * s_mask_t, mask=valid, other=0).to(tl.float32)
    on = weight != 0
    log_ratio = logp - old
    if SEQ_RATIO:
        # GSPO: the sequence's log-ratio on every token, clamped from above only at 10 (GSPO_LOG_RATIO_CAP).
        seq_log_ratio = tl.load(seq_ratio_ptr + b) + tl.zeros([BLOCK_T], tl.float32)
        in_range = seq_log_ratio <= 10.0
        ratio = tl.exp(tl.minimum(seq_log_ratio, 10.0))
    else:
        in_range = (log_ratio >= -20.0) & (log_ratio <= 20.0)
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -20.0), 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    loss = tl.maximum(pg1, pg2)
    # The clamp passes no gradient when pg2 wins; inside the band pg1 == pg2 and both carry -A * ratio.
    dloss = tl.where((pg1 >= pg2) & in_range, -adv * ratio, 0.0)
    dual_weight = tl.zeros([BLOCK_T], tl.float32)
    if DUAL_CLIP:
        # A < 0: the loss is capped at the constant -A * c, which passes no gradient.
        cap = -adv * clip_ratio_c
        dual = (adv < 0) & (loss > cap)
        loss = tl.where(dual, cap, loss)
        dloss = tl.where(dual, 0.0, dloss)
        dual_weight = tl.where(on & dual, weight, 0.0)
    kl = tl.zeros([BLOCK_T], tl.float32)
    if HAS_REF:
        ref = tl.load(ref_ptr + b * s_ref_b + t * s_ref_t, mask=valid, other=0.0).to(tl.float32)
        if KL_TYPE == 0:
            x = ref - logp
            x_c = tl.minimum(tl.maximum(x, -20.0), 20.0)
            r = tl.exp(x_c)
            raw = r - x_c - 1.0
            kl = tl.minimum(tl.maximum(raw, -10.0), 10.0)
            dkl = tl.where((raw >= -10.0) & (raw <= 10.0) & (x >= -20.0) & (x <= 20.0), 1.0 - r, 0.0)
        elif KL_TYPE == 1:
            kl = logp - ref
            dkl = tl.full([BLOCK_T], 1.0, tl.float32)
        else:
            kl = 0.5 * (logp - ref) * (logp - ref)
            dkl = logp - ref
        loss += kl_coef * kl
        dloss += kl_coef * dkl
    tl.store(dloss_ptr + b * seq_len + t, tl.where(on, dloss * weight, 0.0), mask=valid)
    out = partial_ptr + (b * tl.num_programs(1) + blk) * 7
    tl.store(out + 0, tl.sum(tl.where(on, loss * weight, 0.0), axis=0))
    tl.store(out + 1, tl.sum(weight, axis=0))
    tl.store(out + 2, tl.sum(tl.where(on & (pg2 > pg1), weight, 0.0), axis=0))
    tl.store(out + 3, tl.sum(dual_weight, axis=0))
    tl.store(out + 4, tl.sum(tl.where(on, ratio * weight, 0.0), axis=0))
    tl.store(out + 5, tl.sum(tl.where(on, -log_ratio * weight, 0.0), axis=0))
    tl.store(out + 6, tl.sum(tl.where(on, kl * weight, 0.0), axis=0))


@triton.jit
def _policy_loss_bwd_kernel(dloss_ptr, scale_ptr, grad_ptr, seq_len, BF16_RNE: tl.constexpr, BLOCK_T: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = t < seq_len
    d = tl.load(dloss_ptr + b * seq_len + t, mask=valid, other=0.0)
    grad = d * tl.load(scale_ptr + b)
    if BF16_RNE:
        bits = grad.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = grad.to(grad_ptr.dtype.element_ty)
    tl.store(grad_ptr + b * seq_len + t, out, mask=valid)


def _aggregation_weights(row_loss_weight: torch.Tensor, seq_len: int, agg: str) -> torch.Tensor:
    """Per-sequence factor w_b with loss = sum_b w_b * (sum_t mask * loss); the backward reuses it."""
    if agg == "token-mean":
        return (1.0 / (row_loss_weight.sum() + MASKED_MEAN_EPS)).expand_as(row_loss_weight)
    if agg == "seq-mean-token-sum-norm":
        return torch.full_like(row_loss_weight, 1.0 / max(seq_len, 1))
    present = row_loss_weight > 0
    sequences = present.sum().clamp_min(1)
    return torch.where(present, 1.0 / ((row_loss_weight + MASKED_MEAN_EPS) * sequences), 0.0)


def policy_loss_forward(logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, clip_ratio_c, kl_coef,
                        kl_type, agg, loss_mode="ppo"):
    """Launch the forward kernel: (loss 0-dim, metric sums [5] / weight, per-token dloss [B, T], weights [B]).

    clip_ratio_c None or inf turns dual-clip off (then the kernel is compiled without it); loss_mode "gspo"
    launches the sequence pass first.
    """
    rows, seq_len = logp.shape
    device = logp.device
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand(rows, seq_len)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    block = block_size(seq_len, device, gpu_max=1024, cpu_max=4096)
    blocks = triton.cdiv(seq_len, block)
    dloss = torch.empty(rows, seq_len, dtype=torch.float32, device=device)
    partial = torch.zeros(rows, blocks, _SUMS, dtype=torch.float32, device=device)
    dual_clip = dual_clip_enabled(clip_ratio_c)
    gspo = loss_mode == "gspo"
    seq_ratio = gspo_log_ratio_forward(logp, old_logp, mask, block) if gspo else partial  # unread without GSPO
    if logp.numel():
        ref = ref_logp if ref_logp is not None else logp
        launchable(_policy_loss_fwd_kernel, device)[(rows, blocks)](
            logp, old_logp, advantages, mask, ref, seq_ratio, dloss, partial, seq_len,
            *logp.stride(), *old_logp.stride(), *advantages.stride(), *mask.stride(), *ref.stride(),
            float(clip_low), float(clip_high), float(clip_ratio_c) if dual_clip else 0.0, float(kl_coef),
            DUAL_CLIP=dual_clip, HAS_REF=ref_logp is not None, KL_TYPE=_KL_CODES[kl_type], SEQ_RATIO=gspo,
            BLOCK_T=block)
    sums = partial.sum(1)
    weights = _aggregation_weights(sums[:, 1], seq_len, agg)
    loss = (weights * sums[:, 0]).sum()
    totals = sums.sum(0)
    # clip_frac, dual_clip_frac, ratio_mean, approx_kl, kl: token means over the mask, as verl's masked_mean.
    metrics = totals[[2, 3, 4, 5, 6]] / (totals[1] + MASKED_MEAN_EPS)
    return loss, metrics, dloss, weights


def gspo_log_ratio_forward(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, block: int) -> torch.Tensor:
    """[B] float32 GSPO sequence log-ratios, `reference.gspo_log_ratio`: one pass, partial sums per block.

    `mask` is already the launcher's (bool viewed as uint8).
    """
    rows, seq_len = logp.shape
    blocks = triton.cdiv(seq_len, block)
    partial = torch.zeros(rows, blocks, 2, dtype=torch.float32, device=logp.device)
    if logp.numel():
        launchable(_policy_loss_seq_kernel, logp.device)[(rows, blocks)](
            logp, old_logp, mask, partial, seq_len, *logp.stride(), *old_logp.stride(), *mask.stride(),
            BLOCK_T=block)
    sums = partial.sum(1)
    return sums[:, 0] / sums[:, 1].clamp_min(1.0)


def policy_loss_backward(dloss: torch.Tensor, weights: torch.Tensor, grad_loss: torch.Tensor,
                         dtype: torch.dtype) -> torch.Tensor:
    rows, seq_len = dloss.shape
    grad = torch.empty(rows, seq_len, dtype=dtype, device=dloss.device)
    if dloss.numel() == 0:
        return grad
    scale = (weights * grad_loss.float()).contiguous()
    block = block_size(seq_len, dloss.device, gpu_max=1024, cpu_max=4096)
    launchable(_policy_loss_bwd_kernel, dloss.device)[(rows, triton.cdiv(seq_len, block))](
        dloss, scale, grad, seq_len, BF16_RNE=bf16_by_bits(dtype, dloss.device), BLOCK_T=block)
    return grad


class PolicyLoss(torch.autograd.Function):
    """Autograd wrapper: (loss, metrics [5]); gradient flows to logp only."""

    @staticmethod
    def forward(ctx, logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, clip_ratio_c, kl_coef, kl_type,
                agg, loss_mode):
        loss, metrics, dloss, weights = policy_loss_forward(logp, old_logp, advantages, mask, ref_logp, clip_low,
                                                            clip_high, clip_ratio_c, kl_coef, kl_type, agg, loss_mode)
        ctx.save_for_backward(dloss, weights)
        ctx.logp_dtype = logp.dtype
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, grad_metrics):
        dloss, weights = ctx.saved_tensors
        grad = policy_loss_backward(dloss, weights, grad_loss, ctx.logp_dtype)
        return grad, None, None, None, None, None, None, None, None, None, None, None


def _check(logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, clip_ratio_c, kl_coef, kl_type,
           agg, loss) -> None:
    op = "policy_loss"
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2:
        raise ValueError(f"{op}: logp must be a [B, T] tensor, got {getattr(logp, 'shape', type(logp))}")
    shape = tuple(logp.shape)
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
            raise ValueError(f"{op}: {name} must have logp's shape {shape}, got {getattr(t, 'shape', type(t))}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (shape[:1], shape):
        raise ValueError(f"{op}: advantages must be [B] = {shape[:1]} or [B, T] = {shape}, got "
                         f"{getattr(advantages, 'shape', type(advantages))}")
    for name, t in (("logp", logp), ("old_logp", old_logp), ("advantages", advantages), ("ref_logp", ref_logp)):
        if t is not None and not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a float tensor, got {t.dtype}")
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool, integer or float, got {mask.dtype}")
    if not (0 <= clip_low < 1 and 0 <= clip_high and math.isfinite(clip_high)):
        raise ValueError(f"{op}: need 0 <= clip_low < 1 and finite clip_high >= 0, got {clip_low}, {clip_high}")
    if clip_ratio_c is not None and not (clip_ratio_c > 1):  # also refuses NaN; inf is allowed (= off)
        raise ValueError(f"{op}: clip_ratio_c must be > 1 (dual-clip's cap on the ratio), None or inf (off), "
                         f"got {clip_ratio_c!r}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"{op}: kl_coef must be finite and >= 0, got {kl_coef!r}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError(f"{op}: kl_coef={kl_coef} needs ref_logp (the reference policy's log-probs)")
    if kl_type not in KL_TYPES:
        raise ValueError(f"{op}: kl_type={kl_type!r} is not one of {KL_TYPES}")
    if agg not in AGG_MODES:
        raise ValueError(f"{op}: agg={agg!r} is not one of {AGG_MODES}")
    if loss not in LOSS_MODES:
        raise ValueError(f"{op}: loss={loss!r} is not one of {LOSS_MODES}")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                ref_logp: torch.Tensor | None = None, clip_low: float = 0.2, clip_high: float = 0.2,
                kl_coef: float = 0.0, kl_type: str = "low_var_kl", agg: str = "token-mean",
                clip_ratio_c: float | None = DUAL_CLIP_RATIO, *, loss: str = "ppo",
                impl: str = "auto") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped policy loss (clip-higher, dual-clip) plus `kl_coef` x KL(policy || reference), aggregated by `agg`.

    logp, old_logp, ref_logp: [B, T] float; advantages: [B] per sequence or [B, T] per token; mask:
    [B, T] bool or float weights. clip_ratio_c: dual-clip PPO's cap, default 3.0 as verl's
    `compute_policy_loss`: where A < 0 a token's loss is at most -A * clip_ratio_c (and then passes no
    gradient); None or inf turns it off (plain clipped PPO); otherwise it must be > 1. The cap bounds
    the policy-gradient term only; the KL term is added after it, as verl adds its KL loss.

    loss: "ppo" (one ratio per token) or "gspo" (GSPO: one ratio per sequence, the geometric mean of
    its token ratios, `exp(mean over the mask of logp - old_logp)`, in verl's token form whose gradient
    is each token's own, `reference.policy_loss_reference`). verl's GSPO has no dual-clip and
    aggregates seq-mean-token-mean with clip ranges 3e-4 / 4e-4: the caller passes those.

    Returns `(loss, metrics)`: a 0-dim float32 loss differentiable w.r.t. `logp` only, and detached
    0-dim float32 tensors `clip_frac` (tokens where the clipped term wins, verl's pg_clipfrac),
    `dual_clip_frac` (tokens with A < 0 where the dual-clip cap binds, verl's pg_clipfrac_lower; 0
    when dual-clip is off), `approx_kl` (k1 of old vs current policy, `mean(old_logp - logp)`, verl's
    ppo_kl), `ratio_mean` (of the ratio the clip saw: the sequence's for GSPO), and `kl` (mean KL
    penalty term against the reference) when `ref_logp` is given; all metrics are means over masked tokens.
    """
    _check(logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, clip_ratio_c, kl_coef, kl_type, agg,
           loss)
    impl = resolve_impl(impl, logp, old_logp, advantages, mask, ref_logp, op="policy_loss")
    if impl == "torch":
        return policy_loss_reference(logp, old_logp, advantages, mask, ref_logp, clip_low, clip_high, kl_coef,
                                     kl_type, agg, clip_ratio_c, loss)
    if logp.dtype == torch.float64:
        raise TypeError("policy_loss: float64 runs on the reference only: pass impl='torch'")
    total, values = PolicyLoss.apply(logp, old_logp.detach(), advantages.detach(), mask.detach(),
                                     None if ref_logp is None else ref_logp.detach(), float(clip_low),
                                     float(clip_high), clip_ratio_c, float(kl_coef), kl_type, agg, loss)
    metrics = dict(zip(METRIC_NAMES, values.unbind()))
    if ref_logp is None:
        del metrics["kl"]
    return total, metrics
