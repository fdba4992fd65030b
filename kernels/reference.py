"""PyTorch reference twins of the four kernels: the oracle of the tests and the baseline of the benchmarks.

Each reference is the plain eager form of its op, differentiable by autograd, on any device and in
float64 too (then it computes in float64, which is what `torch.autograd.gradcheck` needs). The
definitions follow verl (volcengine/verl, `verl/trainer/ppo/core_algos.py`):

- GRPO advantages use the unbiased std (`torch.std`); a group of one sample has mean 0 and std 1.
- The PPO ratio is `exp(clamp(logp - old_logp, -20, 20))`; the clipped loss is
  `max(-A * ratio, -A * clamp(ratio, 1 - clip_low, 1 + clip_high))`, and with dual-clip (verl's
  `clip_ratio_c`, 3.0 by default at the commit MedVLThinker pins, 54b2677) a token with A < 0 has
  `min(that, -A * clip_ratio_c)`.
- KL penalties: k1 `logp - ref`, k2 `0.5 (logp - ref)^2`, low_var_kl (k3)
  `exp(ref - logp) - (ref - logp) - 1` with `ref - logp` clamped to +-20 and the result to +-10.
- Aggregation as verl's `agg_loss`.
- GSPO (`loss="gspo"`, verl's `compute_policy_loss_gspo`): one ratio per sequence, the geometric mean of
  its token ratios `s = exp(sum_t mask * (logp - old_logp) / max(sum_t mask, 1))`, in verl's token form
  `s_t = exp(min(sg[log s] + logp_t - sg[logp_t], 10))`: the value of `s` on every token, the gradient
  of each token's own log-prob (GSPO-token of the paper, arXiv:2507.18071); clipped as PPO clips its ratio.

Two deliberate differences, both documented where they apply: masked tokens enter sums through
`torch.where`, so a non-finite value in padding never poisons the loss; and a group whose rewards are
all equal gets advantage exactly 0 (verl divides a rounding residue of the mean by eps).
"""

from __future__ import annotations

import torch

# low_var_kl clamps, as verl: the log-ratio to +-20 (exp stays finite), the estimate to +-10.
LOG_RATIO_CLAMP = 20.0
LOW_VAR_KL_CLAMP = 10.0
# verl's masked_mean divides by (mask.sum() + 1e-8): an empty mask gives 0, not NaN.
MASKED_MEAN_EPS = 1e-8

ADVANTAGE_MODES = ("grpo", "drgrpo", "rloo")
# verl's dual-clip default (`actor.clip_ratio_c` in ppo_trainer.yaml and compute_policy_loss at 54b2677).
DUAL_CLIP_RATIO = 3.0
KL_TYPES = ("low_var_kl", "k1", "k2")
# ppo: one ratio per token; gspo: one per sequence (the geometric mean of its token ratios).
LOSS_MODES = ("ppo", "gspo")
# GSPO's clamp of its log-ratio, from above only (verl's compute_policy_loss_gspo): past it no gradient.
GSPO_LOG_RATIO_CAP = 10.0
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# -- token log-probs ----------------------------------------------------------------------------------


def token_logprobs_reference(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                             return_entropy: bool = False):
    """`log_softmax(logits.float() / T)` gathered at `tokens`; rows whose token is negative give 0."""
    logq = torch.log_softmax(logits.to(_compute_dtype(logits)) / temperature, dim=-1)
    active = tokens >= 0
    logp = logq.gather(-1, tokens.clamp_min(0).long().unsqueeze(-1)).squeeze(-1)
    logp = torch.where(active, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    p = logq.exp()
    # 0 * log 0 = 0: a -inf logit contributes nothing to the entropy.
    entropy = -torch.where(p > 0, p * logq, torch.zeros_like(p)).sum(-1)
    return logp, torch.where(active, entropy, torch.zeros_like(entropy))


def linear_token_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor,
                                    temperature: float = 1.0, return_entropy: bool = False):
    """The naive path the fused op replaces: full logits `hidden @ weight.T`, then token log-probs."""
    return token_logprobs_reference(hidden @ weight.T, tokens, temperature, return_entropy)


# -- group advantages ---------------------------------------------------------------------------------


def group_advantages_reference(rewards: torch.Tensor, group_index: torch.Tensor, mode: str = "grpo",
                               eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter form (verl's `grpo_vectorized`): per-group count, sum, max, min by `index_add_`."""
    dtype = _compute_dtype(rewards)
    r = rewards.to(dtype)
    g = group_index.long()
    size = r.numel()
    count = torch.zeros(size, dtype=dtype, device=r.device).index_add_(0, g, torch.ones_like(r))[g]
    total = torch.zeros(size, dtype=dtype, device=r.device).index_add_(0, g, r)[g]
    mean = total / count
    high = torch.full((size,), -torch.inf, dtype=dtype, device=r.device).scatter_reduce_(0, g, r, "amax")[g]
    low = torch.full((size,), torch.inf, dtype=dtype, device=r.device).scatter_reduce_(0, g, r, "amin")[g]
    constant = high == low
    single = count == 1
    centred = r - mean
    if mode == "grpo":
        squares = torch.zeros(size, dtype=dtype, device=r.device).index_add_(0, g, centred * centred)[g]
        std = (squares / (count - 1)).sqrt()
        adv = torch.where(single, r / (1 + eps), centred / (std + eps))
    elif mode == "drgrpo":
        adv = torch.where(single, r, centred)
    else:
        adv = torch.where(single, r, centred * (count / (count - 1)))
    adv = torch.where(constant & ~single, torch.zeros_like(adv), adv)
    return adv.to(torch.float32) if dtype != torch.float64 else adv, constant


def group_advantages_loop(rewards: torch.Tensor, group_index: torch.Tensor, mode: str = "grpo",
                          eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's estimator as verl writes it: Python dicts and loops over samples, in float64.

    The independent oracle of the tests and the slow baseline of the benchmark (never the library path).
    """
    scores = rewards.detach().double().cpu().tolist()
    index = group_index.detach().cpu().tolist()
    groups: dict[int, list[float]] = {}
    for score, i in zip(scores, index):
        groups.setdefault(i, []).append(score)
    stats = {}
    for i, values in groups.items():
        t = torch.tensor(values, dtype=torch.float64)
        if len(values) == 1:
            stats[i] = (0.0, 1.0)
        else:
            stats[i] = (t.mean().item(), t.std().item())
    adv, constant = [], []
    for score, i in zip(scores, index):
        n = len(groups[i])
        mean, std = stats[i]
        if mode == "grpo":
            a = (score - mean) / (std + eps)
        elif mode == "drgrpo":
            a = score - mean
        else:
            a = score * n / (n - 1) - mean * n / (n - 1) if n > 1 else score
        is_constant = min(groups[i]) == max(groups[i])
        adv.append(0.0 if is_constant and n > 1 else a)
        constant.append(is_constant)
    return torch.tensor(adv, dtype=torch.float64), torch.tensor(constant, dtype=torch.bool)


# -- policy loss --------------------------------------------------------------------------------------


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return masked_sum(values, mask) / (mask.sum() + MASKED_MEAN_EPS)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    terms = torch.where(mask != 0, values * mask, torch.zeros_like(values))
    return terms.sum() if dim is None else terms.sum(dim)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    if kl_type == "k1":
        return logp - ref_logp
    if kl_type == "k2":
        return 0.5 * (logp - ref_logp).square()
    log_ratio = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (log_ratio.exp() - log_ratio - 1).clamp(-LOW_VAR_KL_CLAMP, LOW_VAR_KL_CLAMP)


def agg_loss(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str) -> torch.Tensor:
    """verl's `agg_loss` over a [B, T] loss and mask; fully masked sequences drop out of the seq means."""
    if agg == "token-mean":
        return masked_mean(loss_mat, mask)
    seq_sums = masked_sum(loss_mat, mask, dim=-1)
    if agg == "seq-mean-token-sum-norm":
        # Dr. GRPO: a constant divisor (the padded length) instead of each sequence's own length.
        return seq_sums.sum() / loss_mat.shape[-1]
    counts = mask.sum(-1)
    seq_means = seq_sums / (counts + MASKED_MEAN_EPS)
    present = (counts > 0).to(loss_mat.dtype)
    return (seq_means * present).sum() / present.sum().clamp_min(1)


def dual_clip_enabled(clip_ratio_c: float | None) -> bool:
    """None or inf turns dual-clip off: the cap -A * inf never binds."""
    return clip_ratio_c is not None and clip_ratio_c != float("inf")


def gspo_log_ratio(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] log of GSPO's sequence ratio: the masked mean of the token log-ratios, over max(mask sum, 1) as verl."""
    return masked_sum(logp - old_logp, mask, dim=-1) / mask.sum(-1).clamp_min(1)


def policy_loss_reference(logp, old_logp, advantages, mask, ref_logp=None, clip_low=0.2, clip_high=0.2,
                          kl_coef=0.0, kl_type="low_var_kl", agg="token-mean", clip_ratio_c=DUAL_CLIP_RATIO,
                          loss="ppo"):
    """PPO clipped loss with dual-clip (+ kl_coef * KL to the reference), aggregated; metrics are token means.

    `loss="gspo"` puts GSPO's sequence ratio (module docstring) in place of each token's ratio; the
    clipping, the cap, the KL term and the aggregation stay as they are.

    `clip_frac` counts tokens where the clipped term wins (verl's pg_clipfrac); `dual_clip_frac` those
    with A < 0 whose loss the cap -A * clip_ratio_c replaces (verl's pg_clipfrac_lower; 0 when
    `clip_ratio_c` is None or inf); `approx_kl` is k1 between the old and the current policy,
    `mean(old_logp - logp)` (verl's ppo_kl, per token for GSPO too); `ratio_mean` the mean ratio the
    clip saw; `kl` is the mean of the penalty term against the reference, present only when
    `ref_logp` is given.
    """
    dtype = _compute_dtype(logp)
    lp = logp.to(dtype)
    old = old_logp.detach().to(dtype)
    adv = advantages.detach().to(dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    m = mask.detach().to(dtype)
    log_ratio = lp - old
    if loss == "gspo":
        # lp - sg[lp] is exactly 0: the value is the sequence's, the gradient each token's own.
        seq = gspo_log_ratio(lp.detach(), old, m)[:, None]
        ratio = (lp - lp.detach() + seq).clamp(max=GSPO_LOG_RATIO_CAP).exp()
    else:
        ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss_mat = torch.maximum(pg1, pg2)
    dual = torch.zeros_like(loss_mat, dtype=torch.bool)
    if dual_clip_enabled(clip_ratio_c):
        cap = -adv * clip_ratio_c
        # Strictly above the cap (verl's pg_clipfrac_lower uses gt): at a tie the two are equal anyway.
        dual = (adv < 0) & (loss_mat > cap)
        loss_mat = torch.where(dual, cap, loss_mat)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(lp, ref_logp.detach().to(dtype), kl_type)
        loss_mat = loss_mat + kl_coef * kl
    total = agg_loss(loss_mat, m, agg)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((pg2 > pg1).to(dtype), m),
            "dual_clip_frac": masked_mean(dual.to(dtype), m),
            "approx_kl": masked_mean(-log_ratio, m),
            "ratio_mean": masked_mean(ratio, m),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl, m)
    if dtype != torch.float64:
        total = total.float()
        metrics = {k: v.float() for k, v in metrics.items()}
    return total, metrics
