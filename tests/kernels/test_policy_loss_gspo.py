"""policy_loss(loss="gspo"): the Triton kernel and the reference against two oracles written here, forward
and backward: verl's compute_policy_loss_gspo transcribed step by step (the token form with its
stop-gradient), and GSPO's sequence objective itself (arXiv:2507.18071, eq. 5-7), differentiated by autograd
through the sequence ratio, which the token form must reproduce when advantages are per answer and
sequences are averaged (seq-mean-token-mean)."""

import math

import pytest
import torch

from medvl_engine.kernels import policy_loss
from medvl_engine.kernels.reference import AGG_MODES, KL_TYPES, gspo_log_ratio, policy_loss_reference

pytestmark = pytest.mark.usefixtures("interpreter")

# Kernel vs reference vs oracles in float32: summation orders differ (measured: loss <= 2.2e-7 relative,
# gradient <= 1e-8 absolute).
TOL = dict(atol=1e-6, rtol=1e-5)
GSPO_CLIP = (3e-4, 4e-4)  # GSPO's paper (sec. 5.1) and verl's recipes


def _batch(rows=8, seq_len=37, seed=0, per_token=False, float_mask=False):
    """Each answer's mean log-ratio set apart from the clip edges: inside GSPO's band (rows 0, 1), outside
    it on either side where its advantage's sign clips it (2, 3), far outside unclipped (4, A < 0), and past
    GSPO's clamp at 10 (5, A < 0: unclipped, yet no gradient), outside PPO's band too (6, 7: clipped)."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.randn(rows, seq_len, generator=gen) * 0.5 - 1.5
    mask = torch.rand(rows, seq_len, generator=gen) > 0.3
    mask[:, 0] = True
    if float_mask:
        mask = mask * (0.5 + torch.rand(rows, seq_len, generator=gen))
    m = mask.float()
    noise = torch.randn(rows, seq_len, generator=gen) * 0.3
    noise = noise - (noise * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)  # masked mean 0 per row
    targets = torch.tensor([1e-4, -2e-4, 5e-3, -5e-3, 0.4, 12.0, -0.3, 0.6])[:rows]
    old = logp - noise - targets[:, None]  # mean over the mask of logp - old = target
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, 1.0])[:rows]
    adv = (torch.rand(rows, seq_len, generator=gen) + 0.5) * signs[:, None] if per_token else \
        (torch.rand(rows, generator=gen) + 0.5) * signs
    ref = logp + torch.randn(rows, seq_len, generator=gen)
    return logp, old, adv, mask, ref


def _loss_and_grad(impl, logp, *args, **kwargs):
    x = logp.detach().clone().requires_grad_(True)
    loss, metrics = policy_loss(x, *args, impl=impl, loss="gspo", **kwargs)
    loss.backward()
    return loss.detach(), x.grad, metrics


def _verl_gspo(old_log_prob, log_prob, advantages, response_mask, clip_ratio_low, clip_ratio_high):
    """verl's compute_policy_loss_gspo as verl writes it (then agg_loss seq-mean-token-mean): (loss, pg_clipfrac,
    ppo_kl)."""
    def masked_mean(values, mask):
        return (values * mask).sum() / (mask.sum() + 1e-8)

    if advantages.dim() == 1:
        advantages = advantages[:, None]
    negative_approx_kl = log_prob - old_log_prob
    seq_lengths = torch.sum(response_mask, dim=-1).clamp(min=1)
    negative_approx_kl_seq = torch.sum(negative_approx_kl * response_mask, dim=-1) / seq_lengths
    log_seq_importance_ratio = log_prob - log_prob.detach() + negative_approx_kl_seq.detach().unsqueeze(-1)
    log_seq_importance_ratio = torch.clamp(log_seq_importance_ratio, max=10.0)
    seq_importance_ratio = torch.exp(log_seq_importance_ratio)
    pg_losses1 = -advantages * seq_importance_ratio
    pg_losses2 = -advantages * torch.clamp(seq_importance_ratio, 1 - clip_ratio_low, 1 + clip_ratio_high)
    pg_losses = torch.maximum(pg_losses1, pg_losses2)
    seq_mask = torch.sum(response_mask, dim=-1)
    seq_losses = torch.sum(pg_losses * response_mask, dim=-1) / (seq_mask + 1e-8)
    seq_mask = (seq_mask > 0).float()
    loss = (seq_losses * seq_mask).sum() / seq_mask.sum()
    pg_clipfrac = masked_mean(torch.gt(pg_losses2, pg_losses1).float(), response_mask)
    ppo_kl = masked_mean(-negative_approx_kl, response_mask)
    return loss, pg_clipfrac, ppo_kl


def _sequence_objective(logp, old, adv, mask, clip_low, clip_high):
    """GSPO's objective as the paper states it, negated: the mean over answers of
    min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i), s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|)."""
    m = mask.float()
    s = torch.exp(((logp - old) * m).sum(-1) / m.sum(-1))
    return -torch.minimum(s * adv, s.clamp(1 - clip_low, 1 + clip_high) * adv).mean()


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("clip", [GSPO_CLIP, (0.2, 0.28)])
def test_gspo_matches_verls_token_form(impl, clip):
    logp, old, adv, mask, _ = _batch()
    x = logp.clone().requires_grad_(True)
    want, want_clipfrac, want_kl = _verl_gspo(old, x, adv, mask.float(), *clip)
    want.backward()
    loss, grad, metrics = _loss_and_grad(impl, logp, old, adv, mask, clip_low=clip[0], clip_high=clip[1],
                                         agg="seq-mean-token-mean", clip_ratio_c=None)
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(grad, x.grad, **TOL)
    torch.testing.assert_close(metrics["clip_frac"], want_clipfrac, **TOL)
    torch.testing.assert_close(metrics["approx_kl"], want_kl, **TOL)
    assert metrics["dual_clip_frac"].item() == 0
    # Row 5's log-ratio is past the clamp at 10: its value is e^10 and it passes no gradient; the band
    # clips some rows and not others.
    assert grad[5].abs().sum() == 0 and grad[0].abs().sum() > 0
    assert 0 < metrics["clip_frac"] < 1


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("clip", [GSPO_CLIP, (0.2, 0.28)])
def test_gspo_token_form_is_the_gradient_of_the_sequence_objective(impl, clip):
    # Without the clamp (all rows but 5): per-answer advantages, answers averaged. The stop-gradient form
    # gives each token s_i A_i / |y_i|, the derivative of the sequence objective through s_i.
    rows = [0, 1, 2, 3, 4, 6, 7]
    logp, old, adv, mask, _ = (t[rows] for t in _batch())
    x = logp.clone().requires_grad_(True)
    want = _sequence_objective(x, old, adv, mask, *clip)
    want.backward()
    loss, grad, _ = _loss_and_grad(impl, logp, old, adv, mask, clip_low=clip[0], clip_high=clip[1],
                                   agg="seq-mean-token-mean", clip_ratio_c=None)
    torch.testing.assert_close(loss, want.detach(), **TOL)
    torch.testing.assert_close(grad, x.grad, **TOL)


def test_hand_computed_values():
    # One answer of two tokens, log-ratios 0.2 and 0.4: s = e^0.3, clipped at 1 + 0.28 for A = 1 (no
    # gradient); A = -1 in a second answer of one token with log-ratio -0.1 inside the band: loss -A s,
    # gradient -A s on its token.
    logp = torch.tensor([[-1.0, -2.0], [-1.5, 0.0]])
    old = logp - torch.tensor([[0.2, 0.4], [-0.1, 0.0]])
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0])
    s0, s1 = math.exp(0.3), math.exp(-0.1)
    expected = (-1.28 + s1) / 2  # seq-mean-token-mean
    for impl in ("triton", "torch"):
        loss, grad, metrics = _loss_and_grad(impl, logp, old, adv, mask, clip_low=0.2, clip_high=0.28,
                                             agg="seq-mean-token-mean", clip_ratio_c=None)
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        assert grad.flatten().tolist() == pytest.approx([0.0, 0.0, s1 / 2, 0.0], rel=1e-5)
        assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
        assert metrics["ratio_mean"].item() == pytest.approx((2 * s0 + s1) / 3, rel=1e-6)


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
        torch.testing.assert_close(k_metrics[name], r_metrics[name], **TOL)


@pytest.mark.parametrize("seq_len", [1, 5, 37, 4100])
def test_kernel_matches_reference_across_blocks(seq_len):
    # 4100 tokens: two blocks per answer on the CPU (4096 wide), so the sequence pass adds partial sums.
    logp, old, adv, mask, ref = _batch(rows=4, seq_len=seq_len, seed=3)
    kwargs = dict(ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.05, agg="seq-mean-token-mean")
    k_loss, k_grad, _ = _loss_and_grad("triton", logp, old, adv, mask, **kwargs)
    r_loss, r_grad, _ = _loss_and_grad("torch", logp, old, adv, mask, **kwargs)
    torch.testing.assert_close(k_loss, r_loss, **TOL)
    torch.testing.assert_close(k_grad, r_grad, **TOL)


def test_dual_clip_applies_to_the_sequence_ratio_when_asked():
    # verl's GSPO has none (the trainer passes clip_ratio_c=None); the op keeps the cap orthogonal.
    logp, old, _, mask, _ = _batch(rows=5)
    adv = -torch.ones(5)
    out = [_loss_and_grad(impl, logp, old, adv, mask, clip_ratio_c=1.2) for impl in ("triton", "torch")]
    torch.testing.assert_close(out[0][0], out[1][0], **TOL)
    torch.testing.assert_close(out[0][1], out[1][1], **TOL)
    assert out[0][2]["dual_clip_frac"] > 0 and out[0][1][4].abs().sum() == 0  # row 4: s = e^0.4 > 1.2, capped


def test_padding_garbage_empty_rows_and_empty_batch():
    logp, old, adv, mask, _ = _batch()
    mask[2] = False  # an answer without tokens: ratio e^0, no loss
    logp = logp.masked_fill(~mask, float("nan"))
    for impl in ("triton", "torch"):
        loss, grad, _ = _loss_and_grad(impl, logp, old, adv, mask, agg="seq-mean-token-mean")
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad[~mask].abs().sum() == 0
    x = torch.zeros(0, 4, requires_grad=True)
    loss, _ = policy_loss(x, torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 4, dtype=torch.bool), loss="gspo",
                          impl="triton")
    loss.backward()
    assert loss.item() == 0 and x.grad.shape == (0, 4)


def test_bf16_logp():
    logp, old, adv, mask, ref = _batch(rows=4, seq_len=50, seed=5)
    kwargs = dict(ref_logp=ref, kl_coef=0.1, agg="seq-mean-token-mean", clip_low=0.2, clip_high=0.28)
    k_loss, k_grad, _ = _loss_and_grad("triton", logp.bfloat16(), old, adv, mask, **kwargs)
    r_loss, r_grad, _ = _loss_and_grad("torch", logp.bfloat16(), old, adv, mask, **kwargs)
    assert k_grad.dtype == torch.bfloat16
    torch.testing.assert_close(k_loss, r_loss, **TOL)
    torch.testing.assert_close(k_grad, r_grad, atol=0, rtol=2**-8)  # one bf16 rounding of the same float32


def test_reference_sequence_ratio_and_gradcheck_float64():
    logp, old, adv, mask, ref = (t.double() if t.dtype.is_floating_point else t for t in _batch(rows=5, seq_len=6))
    m = mask.double()
    torch.testing.assert_close(gspo_log_ratio(logp, old, m), ((logp - old) * m).sum(-1) / m.sum(-1))
    x = logp.clone().requires_grad_(True)
    # The stop-gradient form is the true gradient of the sequence objective for seq-mean-token-mean and [B]
    # advantages (see above), so gradcheck's finite differences must agree.
    assert torch.autograd.gradcheck(
        lambda y: policy_loss_reference(y, old, adv, mask, ref, 0.2, 0.28, 0.1, "low_var_kl", "seq-mean-token-mean",
                                        None, "gspo")[0], (x,))


def test_bad_loss_is_named():
    logp, old, adv, mask, _ = _batch(rows=3, seq_len=4)
    with pytest.raises(ValueError, match="loss='gspo2' is not one of"):
        policy_loss(logp, old, adv, mask, loss="gspo2")
