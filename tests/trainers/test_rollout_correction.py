"""Rollout correction (importance weights, rejection, their metrics) against verl's formulas written out here
(`rollout_corr_helper.py` at the commit with token / sequence / geometric levels, 2f2996b7d), the
AlgoConfig settings that choose it, and the trainer applying it: each micro-batch's loss, and the whole
mini-batch's loss equal to verl's over the rejected response mask."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medvl_engine import config as config_lib
from medvl_engine.errors import ConfigError
from medvl_engine.trainers.config import AlgoConfig, GRPOConfig
from medvl_engine.trainers.rollout_correction import (
    RolloutCorrection,
    correction_stats,
    importance_weights,
    rejection_keep,
)

# -- verl's formulas ----------------------------------------------------------------------------------


def _masked_mean(values, mask, axis=None):
    mask = mask.to(values.dtype)
    if axis is None:
        return (values * mask).sum() / (mask.sum() + 1e-8)
    return (values * mask).sum(axis) / (mask.sum(axis) + 1e-8)


def _verl_is_weights(log_ratio, mask, level, threshold):
    """compute_rollout_correction_weights: safety bound, zero at padding, truncate."""
    m = mask.to(log_ratio.dtype)
    if level == "token":
        weights = torch.exp(torch.clamp(log_ratio, min=-20.0, max=20.0))
    else:
        total = (log_ratio * m).sum(-1, keepdim=True)
        weights = torch.exp(torch.clamp(total, min=-20.0, max=20.0)).expand_as(log_ratio)
    return (weights * m).clamp(max=threshold)


def _verl_rs_mask(log_ratio, mask, level, lower, upper):
    """compute_rollout_rejection_mask: the response mask times (lower <= weight <= upper)."""
    m = mask.to(log_ratio.dtype)
    if level == "token":
        x = log_ratio
    elif level == "sequence":
        x = (log_ratio * m).sum(-1, keepdim=True)
    else:
        x = _masked_mean(log_ratio, m, axis=-1).unsqueeze(-1)
    weights = torch.exp(torch.clamp(x, min=-20.0, max=20.0)).expand_as(log_ratio)
    return m * ((weights >= lower) & (weights <= upper)).float()


def _verl_offpolicy_metrics(old, rollout, mask):
    """compute_offpolicy_metrics."""
    log_ratio = old - rollout
    old_mean, rollout_mean = _masked_mean(old, mask, -1), _masked_mean(rollout, mask, -1)
    diff = rollout_mean - old_mean
    rho = torch.exp(torch.clamp(log_ratio, -20, 20))
    seq = (log_ratio * mask).sum(-1)
    return {
        "training_ppl": torch.exp(-old_mean).mean(), "training_log_ppl": (-old_mean).mean(),
        "kl": _masked_mean(rollout - old, mask), "k3_kl": _masked_mean(torch.exp(log_ratio) - log_ratio - 1, mask),
        "rollout_ppl": torch.exp(-rollout_mean).mean(), "rollout_log_ppl": (-rollout_mean).mean(),
        "log_ppl_diff": diff.mean(), "log_ppl_abs_diff": diff.abs().mean(), "log_ppl_diff_max": diff.max(),
        "log_ppl_diff_min": diff.min(), "ppl_ratio": torch.exp(diff).mean(),
        "chi2_token": _masked_mean(rho.square(), mask) - 1,
        "chi2_seq": torch.exp(2 * torch.clamp(seq, -20, 20)).mean() - 1,
    }


def _verl_is_metrics(log_ratio, mask, level, threshold):
    """compute_is_metrics (before truncation)."""
    m = mask.float()
    if level == "token":
        weights = torch.exp(torch.clamp(log_ratio, -20, 20)) * m
        out = {"rollout_is_mean": _masked_mean(weights, m),
               "rollout_is_ratio_fraction_high": _masked_mean((weights > threshold).float(), m),
               "rollout_is_ratio_fraction_low": _masked_mean((weights < 1 / threshold).float(), m),
               "rollout_is_max": weights.masked_fill(~mask, -math.inf).max(),
               "rollout_is_min": weights.masked_fill(~mask, math.inf).min()}
    else:
        total = (log_ratio * m).sum(-1, keepdim=True)
        weights = torch.exp(torch.clamp(total, -20, 20)).expand_as(log_ratio) * m
        out = {"rollout_is_max": torch.exp(torch.clamp(total.max(), max=20)), "rollout_is_min": torch.exp(total.min()),
               "rollout_is_mean": _masked_mean(weights, m),
               "rollout_is_ratio_fraction_high": (total > math.log(threshold)).float().mean(),
               "rollout_is_ratio_fraction_low": (total < math.log(1 / threshold)).float().mean()}
    clamped = weights.clamp(min=1 / threshold, max=threshold)
    mean = _masked_mean(clamped, m)
    out["rollout_is_std"] = torch.sqrt(torch.clamp(_masked_mean(clamped.square(), m) - mean.square(), min=0))
    out["rollout_is_eff_sample_size"] = 1 / _masked_mean((clamped / (mean + 1e-8)).square(), m)
    return out


def _logprobs(rows=6, seq_len=12, seed=0, drift=0.2):
    gen = torch.Generator().manual_seed(seed)
    old = torch.randn(rows, seq_len, generator=gen, dtype=torch.float64) * 0.5 - 1.5
    rollout = old + torch.randn(rows, seq_len, generator=gen, dtype=torch.float64) * drift
    mask = torch.rand(rows, seq_len, generator=gen) > 0.25
    mask[:, 0] = True
    return old.float(), rollout.float(), mask


# -- the math -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level, threshold", [("token", 1.2), ("sequence", 2.0)])
def test_importance_weights_are_verls(level, threshold):
    old, rollout, mask = _logprobs()
    rollout[1, 2] = old[1, 2] - 30.0  # past the safety bound
    got = importance_weights(old - rollout, mask, level, threshold)
    want = _verl_is_weights(old - rollout, mask, level, threshold)
    if level == "sequence":  # one weight per answer; the loss puts it on every token of the answer
        assert got.shape == (old.shape[0],)
        got = got[:, None] * mask
    torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
    assert (got <= threshold).all() and (got[mask] < threshold).any() and not got.requires_grad


@pytest.mark.parametrize("level, lower, upper", [("token", 0.8, 1.25), ("token", 0.5, 1.1), ("sequence", 0.7, 1.5),
                                                 ("geometric", 0.97, 1.02)])
def test_rejection_is_verls(level, lower, upper):
    old, rollout, mask = _logprobs()
    keep = rejection_keep(old - rollout, mask, level, lower, upper)
    want = _verl_rs_mask(old - rollout, mask, level, lower, upper)
    assert keep.dtype == torch.bool
    assert torch.equal(keep.float(), want)
    assert 0 < keep.sum() < mask.sum()  # some rejected, not all
    if level != "token":  # whole answers
        assert all(keep[i].sum() in (0, mask[i].sum()) for i in range(mask.shape[0]))


@pytest.mark.parametrize("is_level, rs_level", [("token", "token"), ("sequence", "geometric"), (None, "sequence"),
                                                ("token", None)])
def test_metrics_are_verls_over_the_step(is_level, rs_level):
    old, rollout, mask = _logprobs(rows=8)
    rs = {"token": (0.8, 1.25), "sequence": (0.7, 1.5), "geometric": (0.97, 1.02), None: (None, None)}[rs_level]
    correction = RolloutCorrection(is_level, 1.5 if is_level else None, rs_level, *rs)
    # Two micro-batches: the sums add up to the step's metrics.
    parts = []
    for rows in (slice(0, 3), slice(3, 8)):
        pm = SimpleNamespace(micro=SimpleNamespace(mask=mask[rows]), old_logp=old[rows], engine_logp=rollout[rows],
                             is_weights=None, loss_mask=None)
        parts.append(correction.apply([pm]))
    sums = parts[0][0] + parts[1][0]
    extrema = torch.maximum(parts[0][1], parts[1][1])
    got = correction.metrics(sums.tolist(), extrema.tolist())
    want = _verl_offpolicy_metrics(old.double(), rollout.double(), mask)
    if is_level:
        want.update(_verl_is_metrics(old.double() - rollout.double(), mask, is_level, 1.5))
    if rs_level:
        keep = _verl_rs_mask(old - rollout, mask, rs_level, *rs)
        want["rollout_rs_masked_fraction"] = _masked_mean(1 - keep, mask.float())
        want["rollout_rs_seq_masked_fraction"] = ((mask.float() - keep).sum(-1) > 0).float().mean()
    assert {k for k in got if not k.startswith("rollout_corr/rollout_rs_ratio")} == {f"rollout_corr/{k}" for k in want}
    for name, value in want.items():
        assert got[f"rollout_corr/{name}"] == pytest.approx(float(value), rel=1e-5, abs=1e-7), name
    if rs_level:
        assert 0 < got["rollout_corr/rollout_rs_masked_fraction"] < 1
        high = got["rollout_corr/rollout_rs_ratio_fraction_high"]
        low = got["rollout_corr/rollout_rs_ratio_fraction_low"]
        per = "rollout_rs_masked_fraction" if rs_level == "token" else "rollout_rs_seq_masked_fraction"
        assert high + low == pytest.approx(got[f"rollout_corr/{per}"]) and high > 0 and low > 0


def test_identical_policies_give_weight_one_and_reject_nothing():
    old, _, mask = _logprobs()
    correction = RolloutCorrection("sequence", 2.0, "geometric", 0.999, 1.001)
    pm = SimpleNamespace(micro=SimpleNamespace(mask=mask), old_logp=old, engine_logp=old.clone(), is_weights=None,
                         loss_mask=None)
    metrics = correction.metrics(*(t.tolist() for t in correction.apply([pm])))
    assert torch.equal(pm.is_weights, torch.ones(old.shape[0])) and torch.equal(pm.loss_mask, mask)
    assert metrics["rollout_corr/kl"] == 0 and metrics["rollout_corr/k3_kl"] == 0
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx(1) and metrics["rollout_corr/rollout_is_max"] == 1
    assert metrics["rollout_corr/rollout_rs_masked_fraction"] == 0


def test_stats_stay_on_the_device_without_engine_logprobs_it_is_an_error():
    old, rollout, mask = _logprobs()
    sums, extrema = correction_stats(old, rollout, mask, is_level="token", is_threshold=2.0, rs_level=None)
    assert sums.dtype == extrema.dtype == torch.float64
    pm = SimpleNamespace(micro=SimpleNamespace(mask=mask), old_logp=old, engine_logp=None, is_weights=None,
                         loss_mask=None)
    with pytest.raises(ConfigError, match="needs the engine's log-probs"):
        RolloutCorrection("token", 2.0).apply([pm])


# -- the settings -------------------------------------------------------------------------------------


def test_off_by_default_and_tis_cap_is_an_alias():
    algo = config_lib.build(GRPOConfig, {}).algo
    assert (algo.rollout_is, algo.rollout_rs, algo.tis_cap) == ("none", "none", 0.0)
    assert RolloutCorrection.from_algo(algo) is None
    alias = config_lib.build(GRPOConfig, {"algo": {"tis_cap": 1.5}}).algo
    new = config_lib.build(GRPOConfig, {"algo": {"rollout_is": "token", "rollout_is_threshold": 1.5}}).algo
    assert alias == new and (alias.rollout_is, alias.rollout_is_threshold, alias.tis_cap) == ("token", 1.5, 0.0)
    # The dump holds the new spelling only, and reads back the same.
    assert config_lib.build(AlgoConfig, config_lib.to_dict(alias)) == alias
    assert config_lib.build(GRPOConfig, {"algo": {"rollout_is": "sequence"}}).algo.rollout_is_threshold == 2.0
    rs = config_lib.build(GRPOConfig, {"algo": {"rollout_rs": "geometric", "rollout_rs_threshold": 1.001}}).algo
    assert rs.rollout_rs_threshold_lower == pytest.approx(1 / 1.001)
    assert RolloutCorrection.from_algo(rs) == RolloutCorrection(None, None, "geometric", 1 / 1.001, 1.001)


@pytest.mark.parametrize("algo, message", [
    ({"rollout_is": "token", "old_logp": "engine"},
     r"algo.rollout_is=token corrects .* algo.old_logp=engine .* pi_old == pi_rollout, every importance weight is 1"),
    ({"tis_cap": 2.0, "old_logp": "engine"}, r"algo.tis_cap=2.0 corrects .* algo.old_logp=engine"),
    ({"rollout_rs": "sequence", "rollout_rs_threshold": 2.0, "old_logp": "engine"},
     r"algo.rollout_rs=sequence corrects .* algo.old_logp=engine"),
    ({"tis_cap": 2.0, "rollout_is": "sequence"}, "tis_cap=2.0 is the old spelling .* give only rollout_is"),
    ({"tis_cap": 2.0, "rollout_is_threshold": 3.0}, "old and the new spelling of one cap"),
    ({"tis_cap": 0.5}, r"algo.tis_cap: must be >= 1"),
    ({"rollout_is": "token", "rollout_is_threshold": 0.9}, r"algo.rollout_is_threshold: must be >= 1"),
    ({"rollout_is_threshold": 3.0}, "caps importance weights, but algo.rollout_is is none"),
    ({"rollout_rs": "token"}, "algo.rollout_rs=token needs algo.rollout_rs_threshold"),
    ({"rollout_rs_threshold": 2.0}, "bounds rejection sampling, but algo.rollout_rs is none"),
    ({"rollout_rs_threshold_lower": 0.5}, "bounds rejection sampling, but algo.rollout_rs is none"),
    ({"rollout_rs": "token", "rollout_rs_threshold": 0.9}, "must hold 1"),
    ({"rollout_rs": "token", "rollout_rs_threshold": 2.0, "rollout_rs_threshold_lower": 1.5}, "must hold 1"),
    ({"rollout_rs": "token", "rollout_rs_threshold": 1.0, "rollout_rs_threshold_lower": 1.0}, "lower < upper"),
    ({"rollout_rs": "token", "rollout_rs_threshold": float("inf")}, "rollout_rs_threshold: must be a finite number"),
    ({"rollout_is": "tokens"}, "'tokens' is not one of"),
])
def test_combinations_that_cannot_work_are_refused(algo, message):
    with pytest.raises(ConfigError, match=message):
        config_lib.build(GRPOConfig, {"algo": algo})


# -- the trainer --------------------------------------------------------------------------------------


class TableLearner:
    """A policy that is a table: the log-prob of answer row r's token t is the parameter theta[r, t]
    (rows named by input_ids[:, 0]). backward divides by the accumulation steps as DeepSpeed does; step
    leaves theta as it is, so every micro-batch of a mini-batch sees the same policy and the gradients add."""

    def __init__(self, theta: torch.Tensor, accumulation: int):
        self.theta = theta.detach().clone().requires_grad_(True)
        self.device = torch.device("cpu")
        self.rank, self.world_size, self.gradient_accumulation_steps = 0, 1, accumulation
        self.engine = SimpleNamespace(get_global_grad_norm=lambda: float(self.theta.grad.norm()))

    def response_logprobs(self, micro, *, temperature=1.0, reference=False, return_entropy=False):
        values = self.theta[micro.input_ids[:, 0]]
        return torch.where(micro.mask, values, torch.zeros_like(values))

    def backward(self, loss):
        (loss / self.gradient_accumulation_steps).backward()

    def step(self):
        pass


def _mini_batch(algo: dict, *, rows=8, per_micro=4, seq_len=10, seed=1, drift=0.2):
    """A trainer over a TableLearner and one mini-batch of `rows` answers in micro-batches, with old,
    engine and reference log-probs and per-answer advantages filled in as fill_logprobs would."""
    from medvl_engine.trainers.grpo import GRPOTrainer, PolicyMicroBatch
    from medvl_engine.trainers.learner import MicroBatch

    gen = torch.Generator().manual_seed(seed)
    theta = torch.randn(rows, seq_len, generator=gen) * 0.5 - 1.5
    old = theta + torch.randn(rows, seq_len, generator=gen) * 0.1
    engine = old + torch.randn(rows, seq_len, generator=gen) * drift
    ref = theta + torch.randn(rows, seq_len, generator=gen) * 0.3
    mask = torch.rand(rows, seq_len, generator=gen) > 0.3
    mask[:, 0] = True
    advantages = torch.randn(rows, generator=gen)
    cfg = config_lib.build(GRPOConfig, {"algo": {"kl_coef": 0.05, **algo}})
    learner = TableLearner(theta, rows // per_micro)
    trainer = GRPOTrainer(cfg, learner, source=None, sync=None)
    lengths = mask.sum(-1).double()
    per_token = cfg.algo.loss_agg == "token-mean"
    mini = []
    for start in range(0, rows, per_micro):
        idx = torch.arange(start, start + per_micro)
        ids = torch.zeros(per_micro, seq_len + 1, dtype=torch.long)
        ids[:, 0] = idx
        micro = MicroBatch(ids, torch.ones_like(ids), torch.zeros(per_micro, seq_len, dtype=torch.long), mask[idx])
        units = float(lengths[idx].sum() / lengths.sum()) if per_token else per_micro / rows
        mini.append(PolicyMicroBatch(micro, advantages[idx], units * learner.gradient_accumulation_steps,
                                     engine_logp=engine[idx], old_logp=old[idx], ref_logp=ref[idx]))
    data = SimpleNamespace(theta=theta, old=old, engine=engine, ref=ref, mask=mask, advantages=advantages)
    return trainer, learner, mini, data


def _verl_actor_loss(log_prob, old_log_prob, advantages, response_mask, rollout_is_weights, algo, ref_log_prob):
    """verl's actor loss over the whole mini-batch: compute_policy_loss_vanilla (dual-clip) times the IS weights,
    aggregated over the (rejected) response mask, plus kl_coef times the low_var_kl loss over the same mask."""
    def agg(loss_mat):
        if algo.loss_agg == "token-mean":
            return (loss_mat * response_mask).sum() / response_mask.sum()
        counts = response_mask.sum(-1)
        seq = (loss_mat * response_mask).sum(-1) / (counts + 1e-8)
        present = (counts > 0).float()
        return (seq * present).sum() / present.sum()

    adv = advantages[:, None]
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20, 20))
    pg_losses1, pg_losses2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - algo.clip_low, 1 + algo.clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clip_pg_losses2 = torch.min(-adv * algo.clip_ratio_c, clip_pg_losses1)
    pg_losses = torch.where(adv < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    kl = ref_log_prob - log_prob
    kld = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    return agg(pg_losses) + algo.kl_coef * agg(kld)


@pytest.mark.parametrize("algo", [
    {"rollout_is": "token", "rollout_is_threshold": 1.2, "rollout_rs": "token", "rollout_rs_threshold": 1.25},
    {"rollout_is": "sequence", "rollout_rs": "geometric", "rollout_rs_threshold": 1.03,
     "loss_agg": "seq-mean-token-mean"},
    {"rollout_rs": "sequence", "rollout_rs_threshold": 1.5, "rollout_rs_threshold_lower": 0.8},
    {"rollout_is": "token"},
], ids=["token-IS+token-RS", "seq-IS+geo-RS+seq-mean", "seq-RS", "token-IS"])
def test_the_mini_batch_loss_is_verls_over_the_rejected_mask(algo):
    trainer, learner, mini, d = _mini_batch(algo)
    trainer.correct_rollouts([mini])
    stats = trainer.train_mini_batch(mini)
    a = trainer.cfg.algo
    log_ratio = d.old - d.engine
    weights = None if a.rollout_is == "none" else _verl_is_weights(log_ratio, d.mask, a.rollout_is,
                                                                   a.rollout_is_threshold)
    keep = d.mask.float() if a.rollout_rs == "none" else _verl_rs_mask(log_ratio, d.mask, a.rollout_rs,
                                                                       a.rollout_rs_threshold_lower,
                                                                       a.rollout_rs_threshold)
    if a.rollout_rs != "none":
        assert 0 < keep.sum() < d.mask.sum()  # the test rejects some tokens, not all
    x = d.theta.clone().requires_grad_(True)
    want = _verl_actor_loss(x, d.old, d.advantages, keep, weights, a, d.ref)
    want.backward()
    assert stats["loss"] == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(learner.theta.grad, x.grad, atol=1e-7, rtol=1e-5)


def test_with_options_off_the_loss_gets_todays_inputs(monkeypatch):
    """Today's path, inputs for inputs: the answer mask and advantages as they were (the same tensors), the
    clip settings, and `loss` at policy_loss's own default, so the same kernel runs on the same numbers."""
    import inspect

    import medvl_engine.kernels as kernels

    calls = []
    real = kernels.policy_loss

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "policy_loss", recording)
    trainer, learner, mini, _ = _mini_batch({})
    assert trainer.correction is None
    trainer.train_mini_batch(mini)
    assert inspect.signature(real).parameters["loss"].default == "ppo"
    for pm, (args, kwargs) in zip(mini, calls):
        assert args[1] is pm.old_logp and args[2] is pm.advantages and args[3] is pm.micro.mask
        assert kwargs == dict(ref_logp=pm.ref_logp, clip_low=0.2, clip_high=0.2, kl_coef=0.05, kl_type="low_var_kl",
                              agg="token-mean", clip_ratio_c=3.0, loss="ppo")


# Every new setting spelled out at its "off" value (and the clip range and aggregation PPO resolves to).
OFF = {"loss": "ppo", "rollout_is": "none", "rollout_rs": "none", "tis_cap": 0.0, "clip_low": 0.2, "clip_high": 0.2,
       "loss_agg": "token-mean", "rollout_is_threshold": None, "rollout_rs_threshold": None,
       "rollout_rs_threshold_lower": None}


def test_with_options_off_losses_and_gradients_are_bit_identical():
    results = []
    for algo in ({}, OFF):
        trainer, learner, mini, _ = _mini_batch(algo)
        stats = trainer.train_mini_batch(mini)
        results.append((stats, learner.theta.grad))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_tis_cap_weights_the_advantages_as_before(monkeypatch):
    import medvl_engine.kernels as kernels

    advantages = []
    real = kernels.policy_loss
    monkeypatch.setattr(kernels, "policy_loss", lambda *a, **k: (advantages.append(a[2]), real(*a, **k))[1])
    trainer, learner, mini, _ = _mini_batch({"tis_cap": 1.1})
    trainer.correct_rollouts([mini])
    trainer.train_mini_batch(mini)
    for pm, got in zip(mini, advantages):
        # The code before the rollout correction: min(exp(old - engine), cap) on the answer tokens.
        before = pm.advantages[:, None] * (torch.exp(pm.old_logp - pm.engine_logp).clamp(max=1.1) * pm.micro.mask)
        assert torch.equal(got, before)


def test_gspo_reaches_the_loss_with_its_own_settings(monkeypatch):
    import medvl_engine.kernels as kernels

    calls = []
    real = kernels.policy_loss
    monkeypatch.setattr(kernels, "policy_loss", lambda *a, **k: (calls.append(k), real(*a, **k))[1])
    trainer, _, mini, _ = _mini_batch({"loss": "gspo"})
    trainer.train_mini_batch(mini)
    assert calls[0] | {"ref_logp": None} == dict(ref_logp=None, clip_low=3e-4, clip_high=4e-4, kl_coef=0.05,
                                                 kl_type="low_var_kl", agg="seq-mean-token-mean", clip_ratio_c=None,
                                                 loss="gspo")


# -- a run --------------------------------------------------------------------------------------------

METRICS = {f"rollout_corr/{name}" for name in (
    "kl", "k3_kl", "chi2_token", "chi2_seq", "training_ppl", "rollout_ppl", "training_log_ppl", "rollout_log_ppl",
    "log_ppl_diff", "log_ppl_abs_diff", "log_ppl_diff_max", "log_ppl_diff_min", "ppl_ratio", "rollout_is_mean",
    "rollout_is_max", "rollout_is_min", "rollout_is_std", "rollout_is_eff_sample_size",
    "rollout_is_ratio_fraction_high", "rollout_is_ratio_fraction_low", "rollout_rs_masked_fraction",
    "rollout_rs_seq_masked_fraction", "rollout_rs_ratio_fraction_high", "rollout_rs_ratio_fraction_low")}


def test_a_gspo_run_with_rollout_correction_logs_its_metrics(toy_model, tmp_path):
    import json

    from test_grpo import run_toy, toy_config

    cfg = toy_config(toy_model, tmp_path / "run", loss="gspo", rollout_is="sequence", rollout_rs="geometric",
                     rollout_rs_threshold=1.001)
    cfg.steps = 2
    run_toy(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert METRICS <= set(row) and all(np.isfinite(row[k]) for k in METRICS)
        assert np.isfinite(row["loss"])
        # The hf engine and the learner run the same fp32 weights: the policies agree to ~1e-6 per token.
        assert abs(row["rollout_corr/kl"]) < 1e-5 and row["rollout_corr/k3_kl"] < 1e-8
        assert row["rollout_corr/rollout_is_max"] == pytest.approx(1, abs=1e-4)
        assert row["rollout_corr/rollout_rs_masked_fraction"] == 0


@pytest.mark.slow
def test_a_run_with_every_option_spelled_off_is_the_default_run(toy_model, tmp_path):
    from test_grpo import run_toy, toy_config

    timings = {"tokens_per_s", "rollout_wait_s", "train_s", "sync_s", "seconds"}
    runs = []
    for name, algo in (("default", {}), ("off", OFF)):
        cfg = toy_config(toy_model, tmp_path / name, kl_coef=0.01, **algo)
        cfg.steps = 2
        history, _ = run_toy(cfg)
        runs.append([{k: v for k, v in row.items() if k not in timings} for row in history])
    assert runs[0] == runs[1]
    assert not any(k.startswith("rollout_corr/") for k in runs[0][0])
