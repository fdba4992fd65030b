"""group_advantages: the Triton kernels and the scatter reference against verl's Python loop (float64)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from medvl_engine.kernels import group_advantages
from medvl_engine.kernels.reference import ADVANTAGE_MODES, group_advantages_loop

# Every test here launches Triton on CPU tensors (or sits beside those that do).
pytestmark = pytest.mark.usefixtures("interpreter")

# float32 kernel vs float64 loop: rewards in [-3, 3], advantages up to ~sqrt(n) apart; measured <= 3e-7.
TOL = dict(atol=2e-6, rtol=1e-5)


def _uneven_shuffled(seed=0):
    """Groups of sizes 1, 1, 2, 3, 5, 8 and a constant group of 4, ids sparse, samples shuffled."""
    gen = torch.Generator().manual_seed(seed)
    sizes = {17: 1, 3: 1, 0: 2, 19: 3, 8: 5, 11: 8, 23: 4}  # ids sparse but < 24 samples
    index = torch.cat([torch.full((n,), g) for g, n in sizes.items()])
    rewards = torch.randint(0, 2, (index.numel(),), generator=gen).float()
    rewards[index == 11] = torch.rand(8, generator=gen) * 6 - 3
    rewards[index == 23] = 0.7
    order = torch.randperm(index.numel(), generator=gen)
    return rewards[order], index[order]


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_matches_verl_loop(mode, impl):
    rewards, index = _uneven_shuffled()
    advantages, constant = group_advantages(rewards, index, mode, impl=impl)
    expected, expected_constant = group_advantages_loop(rewards, index, mode)
    assert advantages.dtype == torch.float32 and constant.dtype == torch.bool
    torch.testing.assert_close(advantages.double(), expected, **TOL)
    assert torch.equal(constant, expected_constant)


def test_conventions_for_singletons_and_constant_groups():
    rewards = torch.tensor([2.0, 1.0, 1.0, 0.0, 1.0])
    index = torch.tensor([4, 1, 1, 0, 0])
    for impl in ("triton", "torch"):
        grpo, constant = group_advantages(rewards, index, "grpo", eps=1e-6, impl=impl)
        assert grpo[0] == pytest.approx(2.0 / (1 + 1e-6))  # verl: a lone sample has mean 0, std 1
        assert grpo[1] == 0 and grpo[2] == 0  # all equal: exactly 0, not rounding / eps
        # Two samples 0 and 1: mean 0.5, unbiased std sqrt(0.5).
        assert grpo[3] == pytest.approx(-0.5 / (0.5**0.5 + 1e-6)) and grpo[4] == pytest.approx(0.5 / (0.5**0.5 + 1e-6))
        assert constant.tolist() == [True, True, True, False, False]
        drgrpo, _ = group_advantages(rewards, index, "drgrpo", impl=impl)
        assert drgrpo.tolist() == [2.0, 0.0, 0.0, -0.5, 0.5]
        rloo, _ = group_advantages(rewards, index, "rloo", impl=impl)
        assert rloo.tolist() == [2.0, 0.0, 0.0, -1.0, 1.0]  # r minus the mean of the others


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9), st.sampled_from([0.0, 1.0, 0.5, -2.25, 3.0])), min_size=1, max_size=40),
       st.sampled_from(ADVANTAGE_MODES))
def test_kernel_equals_loop_on_generated_batches(samples, mode):
    index = torch.tensor([g for g, _ in samples]) % len(samples)
    rewards = torch.tensor([r for _, r in samples])
    advantages, constant = group_advantages(rewards, index, mode, impl="triton")
    expected, expected_constant = group_advantages_loop(rewards, index, mode)
    torch.testing.assert_close(advantages.double(), expected, **TOL)
    assert torch.equal(constant, expected_constant)


def test_half_precision_rewards_and_int32_ids():
    rewards, index = _uneven_shuffled(seed=3)
    a, c = group_advantages(rewards.to(torch.bfloat16), index.int(), impl="triton")
    e, ec = group_advantages_loop(rewards.to(torch.bfloat16).float(), index)
    torch.testing.assert_close(a.double(), e, **TOL)
    assert torch.equal(c, ec)


def test_empty():
    a, c = group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long), impl="triton")
    assert a.shape == (0,) and c.shape == (0,)


def test_bad_inputs_are_named():
    rewards = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"group_index\[2\] = 3 is outside \[0, 3\)"):
        group_advantages(rewards, torch.tensor([0, 0, 3]))
    with pytest.raises(ValueError, match=r"group_index\[1\] = -1"):
        group_advantages(rewards, torch.tensor([0, -1, 0]))
    with pytest.raises(TypeError, match="integer"):
        group_advantages(rewards, torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        group_advantages(rewards, torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="mode"):
        group_advantages(rewards, torch.tensor([0, 0, 1]), mode="ppo")
    with pytest.raises(ValueError, match="1-D float"):
        group_advantages(torch.tensor([1, 0, 1]), torch.tensor([0, 0, 1]))
