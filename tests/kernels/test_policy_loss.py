"""policy_loss: the fused Triton kernel against the verl-style reference, plus hand-computed values and
an independent transcription of verl's compute_policy_loss (dual-clip)."""

import math

import pytest
import torch

from medvl_engine.kernels import policy_loss
from medvl_engine.kernels.reference import AGG_MODES, KL_TYPES, policy_loss_reference

# Every test here launches Triton on CPU tensors (or sits beside those that do).
pytestmark = pytest.mark.usefixtures("interpreter")

# Kernel vs reference, both float32: only the summation order differs (measured <= 6e-8).
TOL = dict(atol=1e-6, rtol=1e-5)


def _batch(rows=5, seq_len=37, seed=0, per_token=False, float_mask=False):
    gen = torch.Generator().manual_seed(seed)
    logp = torch.randn(rows, seq_len, generator=gen) * 0.5 - 1.5
    old = logp + torch.randn(rows, seq_len, generator=gen) * 0.3  # ratios both inside and outside the clip band
    ref = logp + torch.randn(rows, seq_len, generator=gen) * 2.0
    ref[0, :3] = logp[0, :3] + torch.tensor([30.0, -30.0, 12.0])  # low_var_kl clamps at 20 and 10
    old[1, 0] = logp[1, 0] - 25.0  # log-ratio beyond the +-20 clamp
    adv = torch.randn(rows, seq_len, generator=gen) if per_token else torch.randn(rows, generator=gen)
    mask = torch.rand(rows, seq_len, generator=gen) > 0.3
    mask[2] = False  # a fully masked sequence
    if float_mask:
        mask = mask * torch.rand(rows, seq_len, generator=gen)
    return logp, old, adv, mask, ref


def _loss_and_grad(impl, logp, *args, **kwargs):
    x = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(x, *args, impl=impl, **kwargs)
    loss.backward()
    return loss.detach(), x.grad, metrics


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("per_token,float_mask", [(False, False), (True, True)])
def test_kernel_matches_reference(agg, kl_type, per_token, float_mask):
    logp, old, adv, mask, ref = _batch(per_token=per_token, float_mask=float_mask)
    kwargs = dict(ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_type=kl_type, agg=agg)
    k_loss, k_grad, k_metrics = _loss_and_grad("triton", logp, old, adv, mask, **kwargs)
    r_loss, r_grad, r_metrics = _loss_and_grad("torch", logp, old, adv, mask, **kwargs)
    torch.testing.assert_close(k_loss, r_loss, **TOL)
    torch.testing.assert_close(k_grad, r_grad, **TOL)
    assert set(k_metrics) == set(r_metrics) == {"clip_frac", "dual_clip_frac", "approx_kl", "ratio_mean", "kl"}
    for name in r_metrics:
        assert k_metrics[name].dim() == 0 and not k_metrics[name].requires_grad
        torch.testing.assert_close(k_metrics[name], r_metrics[name], **TOL)
    assert 0 < k_metrics["clip_frac"] < 1  # the batch exercises both sides of the clip


def test_hand_computed_values():
    # Two tokens, A = +1 and -1; ratios e^0.5 (clipped at 1.28 for A > 0) and e^-0.1 (inside the band).
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -1.9]])
    adv = torch.tensor([[1.0, -1.0]])
    ref = torch.tensor([[-1.2, -2.0]])
    r0, r1 = math.exp(0.5), math.exp(-0.1)
    pg = [max(-r0, -1.28), max(r1, min(max(r1, 0.8), 1.28))]
    k3 = math.exp(-0.2) + 0.2 - 1  # low_var_kl of token 0; token 1 has ref == logp
    expected = (pg[0] + pg[1]) / 2 + 0.1 * k3 / 2
    # d/dlogp: token 0 clipped (no pg gradient), token 1 -A * ratio; KL: 1 - exp(ref - logp).
    grad = [0.1 * (1 - math.exp(-0.2)) / 2, r1 / 2]
    for impl in ("triton", "torch"):
        loss, g, metrics = _loss_and_grad(impl, logp, old, adv, torch.ones(1, 2, dtype=torch.bool), ref_logp=ref,
                                          clip_low=0.2, clip_high=0.28, kl_coef=0.1)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert g[0].tolist() == pytest.approx(grad, rel=1e-5)
        assert metrics["clip_frac"].item() == pytest.approx(0.5)
        assert metrics["approx_kl"].item() == pytest.approx((-0.5 + 0.1) / 2, rel=1e-5)
        assert metrics["ratio_mean"].item() == pytest.approx((r0 + r1) / 2, rel=1e-6)
        assert metrics["kl"].item() == pytest.approx(k3 / 2, rel=1e-5)


def test_padding_garbage_and_empty_masks():
    logp, old, adv, mask, _ = _batch()
    logp[~mask] = float("nan")  # whatever sits in padding must not reach the loss
    for impl in ("triton", "torch"):
        loss, grad, metrics = _loss_and_grad(impl, logp, old, adv, mask, agg="seq-mean-token-mean")
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and "kl" not in metrics
        assert grad[~mask].abs().sum() == 0
        empty = torch.zeros_like(mask)
        loss, grad, metrics = _loss_and_grad(impl, logp.nan_to_num(), old, adv, empty)
        assert loss.item() == 0 and grad.abs().sum() == 0 and metrics["clip_frac"].item() == 0


def test_bf16_logp_gets_bf16_gradient():
    logp, old, adv, mask, ref = _batch(rows=3, seq_len=50)
    k_loss, k_grad, _ = _loss_and_grad("triton", logp.bfloat16(), old, adv, mask, ref_logp=ref, kl_coef=0.1)
    r_loss, r_grad, _ = _loss_and_grad("torch", logp.bfloat16(), old, adv, mask, ref_logp=ref, kl_coef=0.1)
    assert k_grad.dtype == torch.bfloat16
    torch.testing.assert_close(k_loss, r_loss, **TOL)
    # Both round the same float32 gradient to bf16 (round to nearest even): measured equal.
    torch.testing.assert_close(k_grad, r_grad, atol=0, rtol=2**-8)


def test_empty_batch():
    logp = torch.zeros(0, 4, requires_grad=True)
    loss, metrics = policy_loss(logp, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 4, dtype=torch.bool),
                                impl="triton")
    loss.backward()
    assert loss.item() == 0 and logp.grad.shape == (0, 4)


def test_reference_gradcheck_float64():
    logp, old, adv, mask, ref = (t.double() if t.dtype.is_floating_point else t for t in _batch(rows=3, seq_len=6))
    logp.requires_grad_(True)
    for agg in AGG_MODES:
        for kl_type in KL_TYPES:
            assert torch.autograd.gradcheck(
                lambda x, k=kl_type, a=agg: policy_loss_reference(x, old, adv, mask, ref, 0.2, 0.28, 0.1, k, a)[0],
                (logp,))


def test_bad_inputs_are_named():
    logp, old, adv, mask, ref = _batch(rows=3, seq_len=4)
    with pytest.raises(ValueError, match="needs ref_logp"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages must be"):
        policy_loss(logp, old, adv[:1], mask)
    with pytest.raises(ValueError, match="old_logp must have"):
        policy_loss(logp, old[:, :3], adv, mask)
    with pytest.raises(ValueError, match="kl_type"):
        policy_loss(logp, old, adv, mask, ref, kl_type="k4")
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, mask, agg="seq-mean")
    with pytest.raises(ValueError, match="clip_low"):
        policy_loss(logp, old, adv, mask, clip_low=1.5)
    with pytest.raises(ValueError, match=r"logp must be a \[B, T\]"):
        policy_loss(logp[0], old[0], adv, mask[0])


# -- dual-clip ----------------------------------------------------------------------------------------


def _dual_clip_batch(rows=4, seq_len=29, seed=1):
    """Per-token advantages of both signs and log-ratios ~ N(0, 1): ratio > 3 on about 1 token in 7."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.randn(rows, seq_len, generator=gen) * 0.5 - 1.5
    old = logp + torch.randn(rows, seq_len, generator=gen)
    ref = logp + torch.randn(rows, seq_len, generator=gen) * 0.5
    adv = torch.randn(rows, seq_len, generator=gen)
    mask = torch.rand(rows, seq_len, generator=gen) > 0.2
    return logp, old, adv, mask, ref


def _verl_policy_loss(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c,
                      ref_log_prob, kl_coef):
    """verl 54b2677's actor loss, step by step as verl writes it: compute_policy_loss (token-mean), then
    `+ kl_coef * agg_loss(low_var_kl)` as dp_actor adds its KL loss. Returns (loss, pg_clipfrac, pg_clipfrac_lower)."""
    mask = response_mask.float()

    def masked_mean(values):
        return (values * mask).sum() / (mask.sum() + 1e-8)

    ratio = torch.exp(log_prob - old_log_prob)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float())
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (advantages < 0).float())
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    kl = ref_log_prob - log_prob
    kld = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    return masked_mean(pg_losses) + kl_coef * masked_mean(kld), pg_clipfrac, pg_clipfrac_lower


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dual_clip_example(impl):
    # A = -1, ratio 5, c = 3: verl's loss is capped at -A * c = 3 and passes no gradient; plain PPO
    # (dual-clip off) gives -A * ratio = 5 with gradient d(ratio)/d(logp) = ratio = 5.
    old = torch.tensor([[-2.0]])
    logp = old + math.log(5.0)
    adv, mask = torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool)
    loss, grad, metrics = _loss_and_grad(impl, logp, old, adv, mask, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0, rel=1e-6)
    assert grad.item() == 0
    assert metrics["dual_clip_frac"].item() == pytest.approx(1.0) and metrics["clip_frac"].item() == 0
    for off in (None, math.inf):
        loss, grad, metrics = _loss_and_grad(impl, logp, old, adv, mask, clip_ratio_c=off)
        assert loss.item() == pytest.approx(5.0, rel=1e-6)
        assert grad.item() == pytest.approx(5.0, rel=1e-6)
        assert metrics["dual_clip_frac"].item() == 0


def test_dual_clip_is_the_default():
    old = torch.tensor([[-2.0]])
    logp = old + math.log(5.0)
    loss, _ = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1, dtype=torch.bool))
    assert loss.item() == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize("clip_ratio_c", [3.0, 1.5])
@pytest.mark.parametrize("agg", AGG_MODES)
def test_dual_clip_kernel_matches_reference(clip_ratio_c, agg):
    logp, old, adv, mask, ref = _dual_clip_batch()
    kwargs = dict(ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.05, agg=agg, clip_ratio_c=clip_ratio_c)
    k_loss, k_grad, k_metrics = _loss_and_grad("triton", logp, old, adv, mask, **kwargs)
    r_loss, r_grad, r_metrics = _loss_and_grad("torch", logp, old, adv, mask, **kwargs)
    torch.testing.assert_close(k_loss, r_loss, **TOL)
    torch.testing.assert_close(k_grad, r_grad, **TOL)
    for name in r_metrics:
        torch.testing.assert_close(k_metrics[name], r_metrics[name], **TOL)
    assert 0.05 < k_metrics["dual_clip_frac"] < 0.5  # the cap binds on some tokens, not all
    # A capped token passes no gradient from the policy term: only the KL term's is left.
    _, kl_grad, _ = _loss_and_grad("torch", logp, old, torch.zeros_like(adv), mask, **kwargs)
    capped = mask & (adv < 0) & ((logp - old).exp() > clip_ratio_c)
    assert capped.any()
    torch.testing.assert_close(k_grad[capped], kl_grad[capped], **TOL)


@pytest.mark.parametrize("clip_ratio_c", [3.0, 1.5])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dual_clip_matches_verl_formula(impl, clip_ratio_c):
    logp, old, adv, mask, ref = _dual_clip_batch(seed=2)
    x = logp.clone().requires_grad_(True)
    want, want_clipfrac, want_lower = _verl_policy_loss(old, x, adv, mask, 0.2, 0.28, clip_ratio_c, ref, 0.01)
    want.backward()
    loss, grad, metrics = _loss_and_grad(impl, logp, old, adv, mask, ref_logp=ref, clip_low=0.2, clip_high=0.28,
                                         kl_coef=0.01, clip_ratio_c=clip_ratio_c)
    assert want_lower > 0
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(grad, x.grad, **TOL)
    torch.testing.assert_close(metrics["clip_frac"], want_clipfrac, **TOL)
    torch.testing.assert_close(metrics["dual_clip_frac"], want_lower, **TOL)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_dual_clip_off(impl):
    logp, old, adv, mask, ref = _dual_clip_batch(seed=3)
    kwargs = dict(ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.05)
    off = [_loss_and_grad(impl, logp, old, adv, mask, clip_ratio_c=c, **kwargs) for c in (None, math.inf)]
    on_loss, on_grad, on_metrics = _loss_and_grad(impl, logp, old, adv, mask, clip_ratio_c=3.0, **kwargs)
    for loss, grad, metrics in off:
        torch.testing.assert_close(loss, off[0][0], atol=0, rtol=0)
        torch.testing.assert_close(grad, off[0][1], atol=0, rtol=0)
        assert metrics["dual_clip_frac"].item() == 0
        # Without the cap, the loss is larger wherever the cap would have bound.
        assert loss > on_loss and on_metrics["dual_clip_frac"] > 0
    # Plain clipped PPO: verl's formula with a cap that never binds.
    x = logp.clone().requires_grad_(True)
    want, _, _ = _verl_policy_loss(old, x, adv, mask, 0.2, 0.28, 1e30, ref, 0.05)
    want.backward()
    torch.testing.assert_close(off[0][0], want.detach(), **TOL)
    torch.testing.assert_close(off[0][1], x.grad, **TOL)


def test_bad_clip_ratio_c():
    logp, old, adv, mask, _ = _batch(rows=3, seq_len=4)
    for bad in (1.0, 0.5, -math.inf, math.nan):
        with pytest.raises(ValueError, match="clip_ratio_c"):
            policy_loss(logp, old, adv, mask, clip_ratio_c=bad)
