"""The compiled kernels on a CUDA device at the learner's real shapes, against a float64 oracle.

Each test draws fresh random inputs (seed printed on failure; MEDVL_TEST_SEED fixes it), computes the
float64 oracle and the eager PyTorch reference in the input dtype, then fills the allocator's free
memory with 0xFF bytes (NaN in every float dtype) and runs the Triton path: an output element the
kernel forgets to write reads NaN instead of a value an earlier computation left behind. The kernel's
largest error against the oracle must be at most twice the reference's (plus four float32 ulps of the
oracle's magnitude): in bf16 both round their outputs and logits, in fp32 they differ by summation order.
Skipped without CUDA; `scripts/gpu-check` runs them.
"""

import os

import pytest
import torch

from medvl_engine.kernels import group_advantages, linear_token_logprobs, policy_loss, token_logprobs
from medvl_engine.kernels.reference import (
    ADVANTAGE_MODES,
    AGG_MODES,
    KL_TYPES,
    group_advantages_reference,
    linear_token_logprobs_reference,
    policy_loss_reference,
    token_logprobs_reference,
)

pytestmark = pytest.mark.gpu

VOCAB = 151_936  # Qwen2.5-VL
HIDDEN = 3584  # Qwen2.5-VL-7B
BATCH, SEQ = 4, 1024  # 4096 tokens: a fifth of a 16k micro-batch keeps the float64 oracle at ~5 GB a copy
SAMPLES, GROUPS = 1 << 20, 1 << 16
POLICY_BATCH, POLICY_SEQ = 512, 4096
DTYPES = [torch.bfloat16, torch.float32]


@pytest.fixture
def gen(cuda, request):
    seed = int(os.environ.get("MEDVL_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    request.node.user_properties.append(("seed", seed))
    return torch.Generator(device=cuda).manual_seed(seed)


def poison_free_memory(device: torch.device) -> None:
    """Fill what the caching allocator hands out next with 0xFF bytes: NaN as bf16, fp16 and fp32."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    large = torch.empty(free // 2, dtype=torch.uint8, device=device).fill_(0xFF)
    # Blocks up to 1 MiB come from a separate pool of 2 MiB segments.
    small = [torch.empty(1 << 20, dtype=torch.uint8, device=device).fill_(0xFF) for _ in range(64)]
    del large, small


def assert_as_close_as_reference(kernel, reference, oracle, what, seed, slack=2.0):
    oracle = oracle.detach().double()
    k_err = (kernel.detach().double() - oracle).abs().max().item()
    r_err = (reference.detach().double() - oracle).abs().max().item()
    ulps = 4 * 2**-23 * oracle.abs().max().item()
    assert k_err <= slack * r_err + ulps, (f"{what}: kernel error {k_err:.3g} > {slack} x reference error "
                                           f"{r_err:.3g} + {ulps:.3g} (seed {seed})")


# -- token log-probs ----------------------------------------------------------------------------------


def _token_logprobs_run(fn, model_output, layout, tokens, row_weights):
    """Outputs and the gradient w.r.t. the [B, T + 1, V] model output of which `layout` takes T positions."""
    x = model_output.detach().clone().requires_grad_(True)
    logits = x[:, :-1] if layout == "[B, T, V] view" else x[:, :-1].reshape(-1, x.shape[-1])
    logp, entropy = fn(logits, tokens.view(logits.shape[:-1]))
    (row_weights[0] * logp.view(-1)).sum().add((row_weights[1] * entropy.view(-1)).sum()).backward()
    return logp.detach().view(-1), entropy.detach().view(-1), x.grad[:, :-1].reshape(-1, x.shape[-1])


@pytest.mark.parametrize("layout", ["[N, V]", "[B, T, V] view"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprobs_at_the_qwen_vocabulary(cuda, gen, dtype, layout):
    # The learner hands over logits[:, :-1] of the model output: a strided view, or a contiguous copy.
    model_output = (torch.randn(BATCH, SEQ + 1, VOCAB, device=cuda, generator=gen) * 3).to(dtype)
    tokens = torch.randint(0, VOCAB, (BATCH * SEQ,), device=cuda, generator=gen)
    tokens[0], tokens[-1], tokens[1:40:3] = 0, VOCAB - 1, -100  # both vocabulary ends and masked rows
    row_weights = torch.randn(2, BATCH * SEQ, device=cuda, generator=gen)
    temperature = 0.9

    def op(impl):
        return lambda x, t: token_logprobs(x, t, temperature, return_entropy=True, impl=impl)

    oracle = _token_logprobs_run(lambda x, t: token_logprobs_reference(x, t, temperature, True),
                                 model_output.double(), layout, tokens, row_weights)
    reference = _token_logprobs_run(op("torch"), model_output, layout, tokens, row_weights)
    poison_free_memory(cuda)
    kernel = _token_logprobs_run(op("triton"), model_output, layout, tokens, row_weights)
    assert kernel[2].dtype == dtype
    for name, k, r, o in zip(("logp", "entropy", "grad"), kernel, reference, oracle):
        assert_as_close_as_reference(k, r, o, name, gen.initial_seed())
    masked = tokens < 0
    assert (kernel[0][masked] == 0).all() and (kernel[1][masked] == 0).all() and (kernel[2][masked] == 0).all()


# -- fused linear log-probs ---------------------------------------------------------------------------


def _linear_run(fn, hidden, weight, tokens, row_weights):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(True)
    logp, entropy = fn(h, w, tokens)
    (row_weights[0] * logp).sum().add((row_weights[1] * entropy).sum()).backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_token_logprobs_at_qwen_shapes(cuda, gen, dtype):
    rows = BATCH * SEQ
    hidden = torch.randn(rows, HIDDEN, device=cuda, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, HIDDEN, device=cuda, generator=gen) * 3 * HIDDEN**-0.5).to(dtype)
    tokens = torch.randint(0, VOCAB, (rows,), device=cuda, generator=gen)
    tokens[0], tokens[-1], tokens[1:40:3] = 0, VOCAB - 1, -100
    row_weights = torch.randn(2, rows, device=cuda, generator=gen)

    def op(impl):
        return lambda h, w, t: linear_token_logprobs(h, w, t, 0.9, return_entropy=True, impl=impl)

    oracle = _linear_run(lambda h, w, t: linear_token_logprobs_reference(h, w, t, 0.9, True), hidden.double(),
                         weight.double(), tokens, row_weights)
    reference = _linear_run(op("torch"), hidden, weight, tokens, row_weights)
    poison_free_memory(cuda)
    kernel = _linear_run(op("triton"), hidden, weight, tokens, row_weights)
    for name, k, r, o in zip(("logp", "entropy", "grad_hidden", "grad_weight"), kernel, reference, oracle):
        assert_as_close_as_reference(k, r, o, name, gen.initial_seed())


# -- group advantages ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_advantages_for_a_million_rewards(cuda, gen, dtype, mode):
    # Groups of random sizes (mean 16, singletons included) in random order; rewards on a 0/0.5/1 grid
    # so that some groups are constant.
    index = torch.randint(0, GROUPS, (SAMPLES,), device=cuda, generator=gen)
    rewards = (torch.randint(0, 3, (SAMPLES,), device=cuda, generator=gen) * 0.5).to(dtype)
    oracle, oracle_constant = group_advantages_reference(rewards.double(), index, mode)
    reference, _ = group_advantages_reference(rewards, index, mode)
    poison_free_memory(cuda)
    advantages, constant = group_advantages(rewards, index, mode, impl="triton")
    assert torch.equal(constant, oracle_constant)
    assert_as_close_as_reference(advantages, reference, oracle, f"{mode} advantages", gen.initial_seed())


# -- policy loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("kl_type", KL_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_policy_loss_at_512_sequences_of_4k_tokens(cuda, gen, dtype, kl_type, agg):
    shape = (POLICY_BATCH, POLICY_SEQ)
    logp = (torch.randn(shape, device=cuda, generator=gen) * 0.5 - 1.5).to(dtype)
    old = (logp.float() + torch.randn(shape, device=cuda, generator=gen) * 0.3).to(dtype)
    ref = (logp.float() + torch.randn(shape, device=cuda, generator=gen) * 2).to(dtype)
    advantages = torch.randn(POLICY_BATCH, device=cuda, generator=gen)
    mask = (torch.rand(shape, device=cuda, generator=gen) > 0.3) & ~_near_a_kink(logp, old, ref)
    mask[0] = False  # a fully masked sequence
    kwargs = dict(ref_logp=ref, clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_type=kl_type, agg=agg)

    def run(fn, x):
        x = x.detach().clone().requires_grad_(True)
        loss, metrics = fn(x)
        loss.backward()
        return loss.detach(), x.grad, metrics

    oracle = run(lambda x: policy_loss_reference(x, old.double(), advantages.double(), mask, **{
        **kwargs, "ref_logp": ref.double()}), logp.double())
    reference = run(lambda x: policy_loss(x, old, advantages, mask, impl="torch", **kwargs), logp)
    poison_free_memory(cuda)
    kernel = run(lambda x: policy_loss(x, old, advantages, mask, impl="triton", **kwargs), logp)
    assert kernel[1].dtype == dtype
    seed = gen.initial_seed()
    assert_as_close_as_reference(kernel[0], reference[0], oracle[0], "loss", seed)
    assert_as_close_as_reference(kernel[1], reference[1], oracle[1], "grad", seed)
    assert kernel[2].keys() == oracle[2].keys()
    for name in oracle[2]:
        assert_as_close_as_reference(kernel[2][name], reference[2][name], oracle[2][name], name, seed)


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gspo_policy_loss_at_512_sequences_of_4k_tokens(cuda, gen, dtype, agg):
    shape = (POLICY_BATCH, POLICY_SEQ)
    logp = (torch.randn(shape, device=cuda, generator=gen) * 0.5 - 1.5).to(dtype)
    old = (logp.float() + torch.randn(shape, device=cuda, generator=gen) * 0.3).to(dtype)
    ref = (logp.float() + torch.randn(shape, device=cuda, generator=gen) * 2).to(dtype)
    advantages = torch.randn(POLICY_BATCH, device=cuda, generator=gen)
    x = ref.double() - logp.double()
    mask = (torch.rand(shape, device=cuda, generator=gen) > 0.3) & (x.exp() - x - 1 - 10).abs().ge(1e-2)
    mask[0] = False  # a fully masked sequence
    # GSPO's clip edges 1 - 3e-4 and 1 + 4e-4 against each answer's ratio (~1 +- 0.006 here): answers within
    # 1e-5 of one are left out whole, as _near_a_kink leaves out tokens.
    m = mask.double()
    ratio = (((logp.double() - old.double()) * m).sum(-1) / m.sum(-1).clamp_min(1)).exp()
    mask &= ~((ratio - (1 - 3e-4)).abs().lt(1e-5) | (ratio - (1 + 4e-4)).abs().lt(1e-5))[:, None]
    kwargs = dict(ref_logp=ref, clip_low=3e-4, clip_high=4e-4, kl_coef=0.05, agg=agg, clip_ratio_c=None, loss="gspo")

    def run(fn, x):
        x = x.detach().clone().requires_grad_(True)
        loss, metrics = fn(x)
        loss.backward()
        return loss.detach(), x.grad, metrics

    oracle = run(lambda x: policy_loss_reference(x, old.double(), advantages.double(), mask, **{
        **kwargs, "ref_logp": ref.double()}), logp.double())
    reference = run(lambda x: policy_loss(x, old, advantages, mask, impl="torch", **kwargs), logp)
    poison_free_memory(cuda)
    kernel = run(lambda x: policy_loss(x, old, advantages, mask, impl="triton", **kwargs), logp)
    assert kernel[1].dtype == dtype
    seed = gen.initial_seed()
    assert 0 < oracle[2]["clip_frac"] < 1
    assert_as_close_as_reference(kernel[0], reference[0], oracle[0], "loss", seed)
    assert_as_close_as_reference(kernel[1], reference[1], oracle[1], "grad", seed)
    for name in oracle[2]:
        assert_as_close_as_reference(kernel[2][name], reference[2][name], oracle[2][name], name, seed)


def _near_a_kink(logp, old, ref, margin=1e-3):
    """Tokens within `margin` of a clip edge (ratio 1 - 0.2, 1 + 0.28, the dual-clip cap 3) or of
    low_var_kl's clamp at 10: there the loss or its gradient jumps, and the kernel's fast exp (a few
    ulps) and PyTorch's may fall on opposite sides; the tests mask them out instead of loosening tolerances."""
    ratio = (logp.double() - old.double()).exp()
    x = ref.double() - logp.double()
    near = (ratio - 0.8).abs().lt(margin) | (ratio - 1.28).abs().lt(margin) | (ratio - 3.0).abs().lt(margin)
    return near | (x.exp() - x - 1 - 10).abs().lt(margin * 10)


# -- no host synchronisation --------------------------------------------------------------------------


def test_no_op_synchronises_with_the_host(cuda, gen):
    logits = torch.randn(64, VOCAB, device=cuda, generator=gen).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, VOCAB, (64,), device=cuda, generator=gen)
    hidden = torch.randn(64, 256, device=cuda, generator=gen).bfloat16().requires_grad_(True)
    weight = torch.randn(VOCAB, 256, device=cuda, generator=gen).bfloat16().requires_grad_(True)
    rewards = torch.rand(SAMPLES, device=cuda, generator=gen)
    index = torch.randint(0, GROUPS, (SAMPLES,), device=cuda, generator=gen)
    logp = torch.randn(8, 512, device=cuda, generator=gen).requires_grad_(True)
    mask = torch.rand(8, 512, device=cuda, generator=gen) > 0.2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        lp, ent = token_logprobs(logits, tokens, 0.9, return_entropy=True, impl="triton")
        (lp.sum() + ent.sum()).backward()
        lp, ent = linear_token_logprobs(hidden, weight, tokens, return_entropy=True, impl="triton")
        (lp.sum() + ent.sum()).backward()
        group_advantages(rewards, index, "grpo", impl="triton")
        loss, _ = policy_loss(logp, logp.detach() + 0.1, torch.randn(8, device=cuda, generator=gen), mask,
                              logp.detach() - 0.1, 0.2, 0.28, 0.05, impl="triton")
        loss.backward()
        loss, _ = policy_loss(logp, logp.detach() + 0.1, torch.randn(8, device=cuda, generator=gen), mask,
                              logp.detach() - 0.1, 3e-4, 4e-4, 0.05, loss="gspo", impl="triton")
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
