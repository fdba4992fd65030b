"""Rollout correction: importance weights and rejection masks for answers another policy sampled.

verl's semantics (`verl/trainer/ppo/rollout_corr_helper.py`, `docs/algo/rollout_corr.md` and
`rollout_corr_math.md`), decoupled mode. Three policies: pi_rollout sampled the answers (the engine's
log-probs, which travel with each group), pi_old is the learner's recomputation before the update
(`--algo.old-logp recompute`), pi_theta is trained. The loss's ratio pi_theta / pi_old handles the drift
old -> theta; this module handles rollout -> old, from each token's rho_t = pi_old / pi_rollout:

- importance weights (`--algo.rollout-is`, cap C = `--algo.rollout-is-threshold`), treated as constants,
  multiply each token's policy-gradient loss (not the KL or entropy terms), verl's
  `pg_losses * rollout_is_weights`; the trainer folds them into the advantages, which is the same
  product since the clipped loss is positively homogeneous in A:
    token:    w_t = min(exp(clamp(log rho_t, -20, 20)), C)
    sequence: w   = min(exp(clamp(sum_t log rho_t, -20, 20)), C), one per answer
- rejection (`--algo.rollout-rs`, bounds [lower, upper]) drops tokens or whole answers from the loss
  mask (the policy loss, KL and entropy terms, and the counts the aggregation divides by), keeping those
  whose ratio r lies in [lower, upper] (verl's `rollout_rs` token / sequence / geometric before its
  rename to token_k1 / seq_sum_k1 / seq_mean_k1):
    token:     r_t = exp(clamp(log rho_t, -20, 20))
    sequence:  r   = exp(clamp(sum_t log rho_t, -20, 20))
    geometric: r   = exp(clamp(mean_t log rho_t, -20, 20))   (length-normalised: verl's Geo-RS)

With `--algo.old-logp engine` (verl's bypass mode) pi_old is pi_rollout, every rho is 1: the config refuses
both there (AlgoConfig), and the loss's ratio pi_theta / pi_rollout is the whole correction.

Metrics, every step while either is on, under verl's names (prefix `rollout_corr/`), over the step's answer
tokens (all mini-batches, all ranks) with log rho = log pi_old - log pi_rollout; "rows" are answers:

    kl                       mean_t (log pi_rollout - log pi_old): k1 of KL(pi_rollout || pi_old)
    k3_kl                    mean_t (rho - log rho - 1): k3 of the same KL (log rho clamped to +-20, where verl
                             leaves it unclamped and a token past 88 would log inf)
    chi2_token, chi2_seq     mean_t rho^2 - 1; mean over rows of exp(2 clamp(sum_t log rho, +-20)) - 1
    training_ppl, rollout_ppl, training_log_ppl, rollout_log_ppl
                             per row exp(-mean_t log pi) (or -mean_t log pi), averaged over rows
    log_ppl_diff, log_ppl_abs_diff, log_ppl_diff_max, log_ppl_diff_min, ppl_ratio
                             per row d = mean_t log pi_rollout - mean_t log pi_old: mean, mean |d|, max, min,
                             mean exp(d)
  with --algo.rollout-is (weights before truncation, as verl reports them):
    rollout_is_mean          mean_t of the weight (a sequence's weight counts once per token)
    rollout_is_max, rollout_is_min
    rollout_is_std, rollout_is_eff_sample_size
                             of the weights clamped to [1/C, C]: std, and mean^2 / mean of squares
    rollout_is_ratio_fraction_high, rollout_is_ratio_fraction_low
                             fraction above C, below 1/C (of tokens, or of rows for sequence weights)
  with --algo.rollout-rs:
    rollout_rs_masked_fraction      fraction of the answer tokens rejected
    rollout_rs_seq_masked_fraction  fraction of answers with a rejected token
    rollout_rs_ratio_fraction_high, rollout_rs_ratio_fraction_low
                                    fraction above upper, below lower (of tokens, or of rows)

The statistics are sums on the device (`correction_stats`), added over micro-batches and ranks and read
once per step (`correction_metrics`): no host synchronisation per micro-batch. `RolloutCorrection` applies
the settings of a run (AlgoConfig's rollout_is / rollout_rs) to the trainer's micro-batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from medvl_engine.errors import ConfigError

IS_LEVELS = ("token", "sequence")
RS_LEVELS = ("token", "sequence", "geometric")
# verl's SAFETY_BOUND: log-ratios are clamped to +-20 before exp (exp(20) ~ 4.9e8).
SAFETY_BOUND = 20.0

# Sums over this rank's answer tokens and answers; `correction_metrics` turns them into the metrics.
SUM_NAMES = ("tokens", "rows", "kl", "k3_kl", "rho_sq", "seq_rho_sq", "training_log_ppl", "rollout_log_ppl",
             "training_ppl", "rollout_ppl", "log_ppl_abs_diff", "ppl_ratio",
             "is_weight", "is_clamped", "is_clamped_sq", "is_high", "is_low",
             "rs_rejected", "rs_rejected_rows", "rs_high", "rs_low")
# Reduced with max over ranks: mins enter negated.
EXTREMA_NAMES = ("is_log_max", "neg_is_log_min", "log_ppl_diff_max", "neg_log_ppl_diff_min")


def _row_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(-1)


def _row_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """[B, 1] log-ratio of each answer: the sum over its tokens (sequence) or their mean (geometric)."""
    total = _row_sums(log_ratio, mask)
    if level == "geometric":
        total = total / mask.sum(-1).clamp_min(1)
    return total[:, None]


def importance_weights(log_ratio: torch.Tensor, mask: torch.Tensor, level: str, threshold: float) -> torch.Tensor:
    """Truncated importance weights from log rho = log pi_old - log pi_rollout ([B, T], float).

    token: [B, T], 0 off `mask`; sequence: [B], one per answer. Constants: no gradient flows through them.
    """
    log_ratio = log_ratio.detach()
    if level == "token":
        weights = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp(max=threshold)
        return torch.where(mask, weights, torch.zeros_like(weights))
    if level == "sequence":
        return _row_log_ratio(log_ratio, mask, "sequence")[:, 0].clamp(-SAFETY_BOUND, SAFETY_BOUND).exp().clamp(
            max=threshold)
    raise ValueError(f"importance_weights: level={level!r} is not one of {IS_LEVELS}")


def rejection_ratio(log_ratio: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """The ratio rejection compares with its bounds: [B, T] per token, or [B, 1] per answer."""
    log_ratio = log_ratio.detach()
    if level not in RS_LEVELS:
        raise ValueError(f"rejection: level={level!r} is not one of {RS_LEVELS}")
    x = log_ratio if level == "token" else _row_log_ratio(log_ratio, mask, level)
    return x.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()


def rejection_keep(log_ratio: torch.Tensor, mask: torch.Tensor, level: str, lower: float,
                   upper: float) -> torch.Tensor:
    """[B, T] bool: `mask` without the tokens (or answers) whose ratio lies outside [lower, upper]."""
    ratio = rejection_ratio(log_ratio, mask, level)
    return mask & (ratio >= lower) & (ratio <= upper)


def _masked_max(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    return torch.where(where, values, torch.full_like(values, -math.inf)).max()


def correction_stats(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *,
                     is_level: str | None, is_threshold: float | None, rs_level: str | None,
                     rs_lower: float | None = None, rs_upper: float | None = None,
                     keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums [len(SUM_NAMES)], extrema [len(EXTREMA_NAMES)]) float64 of one micro-batch, on its device.

    `mask` is the answer mask ([B, T] bool), `keep` the rejection's (with `rs_level`); levels None: off.
    Rows without answer tokens count nowhere.
    """
    old, rollout = old_logp.detach().double(), rollout_logp.detach().double()
    log_ratio = old - rollout
    tokens = mask.sum(-1)
    present = tokens > 0
    count = tokens.clamp_min(1).double()
    safe = log_ratio.clamp(-SAFETY_BOUND, SAFETY_BOUND)
    rho = safe.exp()
    seq_sum = _row_sums(log_ratio, mask)
    old_mean, rollout_mean = _row_sums(old, mask) / count, _row_sums(rollout, mask) / count
    diff = rollout_mean - old_mean

    def rows(values):
        return torch.where(present, values, torch.zeros_like(values)).sum()

    sums = dict.fromkeys(SUM_NAMES, torch.zeros((), dtype=torch.float64, device=old.device))
    extrema = dict.fromkeys(EXTREMA_NAMES, torch.full((), -math.inf, dtype=torch.float64, device=old.device))
    sums.update(
        tokens=tokens.sum().double(), rows=present.sum().double(),
        kl=_row_sums(-log_ratio, mask).sum(), k3_kl=_row_sums(rho - safe - 1, mask).sum(),
        rho_sq=_row_sums(rho * rho, mask).sum(),
        seq_rho_sq=rows((2 * seq_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND)).exp()),
        training_log_ppl=rows(-old_mean), rollout_log_ppl=rows(-rollout_mean),
        training_ppl=rows((-old_mean).exp()), rollout_ppl=rows((-rollout_mean).exp()),
        log_ppl_abs_diff=rows(diff.abs()), ppl_ratio=rows(diff.exp()))
    # Masked extrema without a host synchronisation: -inf is max's identity (the step's metrics start there).
    extrema.update(log_ppl_diff_max=_masked_max(diff, present), neg_log_ppl_diff_min=_masked_max(-diff, present))
    if is_level is not None:
        seq_weight = seq_sum.clamp(-SAFETY_BOUND, SAFETY_BOUND).exp()[:, None]
        weight = rho if is_level == "token" else seq_weight.expand_as(rho)
        clamped = weight.clamp(1 / is_threshold, is_threshold)
        sums.update(is_weight=_row_sums(weight, mask).sum(), is_clamped=_row_sums(clamped, mask).sum(),
                    is_clamped_sq=_row_sums(clamped * clamped, mask).sum())
        if is_level == "token":
            sums.update(is_high=_row_sums((weight > is_threshold).double(), mask).sum(),
                        is_low=_row_sums((weight < 1 / is_threshold).double(), mask).sum())
            logs, where = safe, mask
        else:
            sums.update(is_high=rows((seq_sum > math.log(is_threshold)).double()),
                        is_low=rows((seq_sum < -math.log(is_threshold)).double()))
            logs, where = seq_sum, present
        extrema.update(is_log_max=_masked_max(logs, where), neg_is_log_min=_masked_max(-logs, where))
    if rs_level is not None:
        # In the log-probs' own precision, as `rejection_keep` decided.
        ratio = rejection_ratio(old_logp.detach() - rollout_logp.detach(), mask, rs_level)
        if rs_level == "token":
            sums.update(rs_high=_row_sums((ratio > rs_upper).double(), mask).sum(),
                        rs_low=_row_sums((ratio < rs_lower).double(), mask).sum())
        else:
            sums.update(rs_high=rows((ratio[:, 0] > rs_upper).double()), rs_low=rows((ratio[:, 0] < rs_lower).double()))
        rejected = mask & ~keep
        sums.update(rs_rejected=rejected.sum().double(), rs_rejected_rows=rejected.any(-1).sum().double())
    return torch.stack([sums[k] for k in SUM_NAMES]), torch.stack([extrema[k] for k in EXTREMA_NAMES])


def correction_metrics(sums: torch.Tensor | list[float], extrema: torch.Tensor | list[float], *,
                       is_level: str | None, is_threshold: float | None, rs_level: str | None) -> dict[str, float]:
    """The `rollout_corr/...` metrics (module docstring) of a step's summed statistics."""
    s = dict(zip(SUM_NAMES, [float(v) for v in sums]))
    e = dict(zip(EXTREMA_NAMES, [float(v) for v in extrema]))
    tokens, rows = max(s["tokens"], 1.0), max(s["rows"], 1.0)
    out = {
        "kl": s["kl"] / tokens,
        "k3_kl": s["k3_kl"] / tokens,
        "chi2_token": s["rho_sq"] / tokens - 1.0,
        "chi2_seq": s["seq_rho_sq"] / rows - 1.0,
        "training_ppl": s["training_ppl"] / rows,
        "rollout_ppl": s["rollout_ppl"] / rows,
        "training_log_ppl": s["training_log_ppl"] / rows,
        "rollout_log_ppl": s["rollout_log_ppl"] / rows,
        "log_ppl_diff": (s["training_log_ppl"] - s["rollout_log_ppl"]) / rows,
        "log_ppl_abs_diff": s["log_ppl_abs_diff"] / rows,
        "log_ppl_diff_max": e["log_ppl_diff_max"],
        "log_ppl_diff_min": -e["neg_log_ppl_diff_min"],
        "ppl_ratio": s["ppl_ratio"] / rows,
    }
    if is_level is not None:
        mean_c, mean_sq = s["is_clamped"] / tokens, s["is_clamped_sq"] / tokens
        per = tokens if is_level == "token" else rows
        high_log = min(e["is_log_max"], SAFETY_BOUND)
        low_log = -e["neg_is_log_min"]
        out.update({
            "rollout_is_mean": s["is_weight"] / tokens,
            "rollout_is_max": math.exp(high_log) if math.isfinite(high_log) else math.nan,
            "rollout_is_min": math.exp(low_log) if math.isfinite(low_log) else math.nan,
            "rollout_is_std": math.sqrt(max(mean_sq - mean_c * mean_c, 0.0)) if s["tokens"] > 1 else 0.0,
            # verl: 1 / mean((w / (mean + 1e-8))^2) of the clamped weights.
            "rollout_is_eff_sample_size": (mean_c + 1e-8) ** 2 / mean_sq if mean_sq > 0 else math.nan,
            "rollout_is_ratio_fraction_high": s["is_high"] / per,
            "rollout_is_ratio_fraction_low": s["is_low"] / per,
        })
    if rs_level is not None:
        per = tokens if rs_level == "token" else rows
        out.update({
            "rollout_rs_masked_fraction": s["rs_rejected"] / tokens,
            "rollout_rs_seq_masked_fraction": s["rs_rejected_rows"] / rows,
            "rollout_rs_ratio_fraction_high": s["rs_high"] / per,
            "rollout_rs_ratio_fraction_low": s["rs_low"] / per,
        })
    return {f"rollout_corr/{k}": v for k, v in out.items()}


@dataclass(frozen=True)
class RolloutCorrection:
    """One run's correction settings (a level None: that part is off), applied micro-batch by micro-batch."""

    is_level: str | None = None
    is_threshold: float | None = None
    rs_level: str | None = None
    rs_lower: float | None = None
    rs_upper: float | None = None

    @classmethod
    def from_algo(cls, algo) -> RolloutCorrection | None:
        """From AlgoConfig's rollout_is / rollout_rs fields (already checked there); None when both are off."""
        if algo.rollout_is == "none" and algo.rollout_rs == "none":
            return None
        return cls(None if algo.rollout_is == "none" else algo.rollout_is, algo.rollout_is_threshold,
                   None if algo.rollout_rs == "none" else algo.rollout_rs, algo.rollout_rs_threshold_lower,
                   algo.rollout_rs_threshold)

    @torch.no_grad()
    def apply(self, micro_batches) -> tuple[torch.Tensor, torch.Tensor]:
        """Set `is_weights` and `loss_mask` of each micro-batch (grpo.PolicyMicroBatch: `micro.mask`,
        `old_logp`, `engine_logp`); returns their summed (sums, extrema), on the device."""
        sums = extrema = None
        for pm in micro_batches:
            if pm.engine_logp is None:
                raise ConfigError("algo.rollout_is / algo.rollout_rs: rollout correction needs the engine's log-probs "
                                  "of the sampled tokens, but the rollout groups carry none")
            mask = pm.micro.mask
            log_ratio = pm.old_logp - pm.engine_logp
            if self.is_level:
                pm.is_weights = importance_weights(log_ratio, mask, self.is_level, self.is_threshold)
            if self.rs_level:
                pm.loss_mask = rejection_keep(log_ratio, mask, self.rs_level, self.rs_lower, self.rs_upper)
            s, e = correction_stats(pm.old_logp, pm.engine_logp, mask, is_level=self.is_level,
                                    is_threshold=self.is_threshold, rs_level=self.rs_level, rs_lower=self.rs_lower,
                                    rs_upper=self.rs_upper, keep=pm.loss_mask)
            sums = s if sums is None else sums + s
            extrema = e if extrema is None else torch.maximum(extrema, e)
        return sums, extrema

    def metrics(self, sums, extrema) -> dict[str, float]:
        return correction_metrics(sums, extrema, is_level=self.is_level, is_threshold=self.is_threshold,
                                  rs_level=self.rs_level)
