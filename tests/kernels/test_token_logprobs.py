"""token_logprobs: the Triton kernel (interpreted on CPU) against the reference and a float64 oracle."""

import pytest
import torch

from medvl_engine.kernels import token_logprobs
from medvl_engine.kernels.reference import token_logprobs_reference

# Every test here launches Triton on CPU tensors (or sits beside those that do).
pytestmark = pytest.mark.usefixtures("interpreter")

# (atol, rtol) of kernel vs the float32 reference on the same inputs. Outputs differ only by float32
# summation order (measured <= 1e-6); gradients are rounded once to the logits' dtype by both, so
# they may differ by one unit in the last place (bf16 2^-8 relative, fp16 2^-11).
OUT_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5)}
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.float16: (1e-6, 2**-10), torch.bfloat16: (1e-6, 2**-7)}


def _logits(shape, dtype, scale=3.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * scale).to(dtype)


def _tokens(leading, vocab, seed=1):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, leading, generator=gen)
    flat = tokens.view(-1)
    flat[0] = 0  # both ends of the vocabulary
    flat[-1] = vocab - 1
    return tokens


def _run(logits, tokens, temperature, impl, weights=(1.3, -0.7)):
    """Outputs and gradient of a loss that weights log-probs and entropies differently per row."""
    x = logits.detach().clone().requires_grad_(True)
    logp, entropy = token_logprobs(x, tokens, temperature, return_entropy=True, impl=impl)
    row = torch.arange(logp.numel(), dtype=torch.float32).view(logp.shape)
    (weights[0] * (logp * (row + 1)).sum() + weights[1] * (entropy * (row % 3)).sum()).backward()
    return logp.detach(), entropy.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab", [(1, 7), (5, 1000), (3, 4099), (4, 17)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_kernel_matches_reference(rows, vocab, dtype, temperature):
    logits = _logits((rows, vocab), dtype)
    tokens = _tokens((rows,), vocab)
    k_logp, k_ent, k_grad = _run(logits, tokens, temperature, "triton")
    r_logp, r_ent, r_grad = _run(logits, tokens, temperature, "torch")
    atol, rtol = OUT_TOL[dtype]
    torch.testing.assert_close(k_logp, r_logp, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_ent, r_ent, atol=atol, rtol=rtol)
    assert k_grad.dtype == dtype
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(k_grad.float(), r_grad.float(), atol=atol, rtol=rtol)


def test_masked_rows_give_zero_and_no_gradient():
    logits = _logits((4, 300), torch.bfloat16)
    tokens = torch.tensor([5, -100, 299, -1])
    logp, entropy, grad = _run(logits, tokens, 1.0, "triton")
    assert logp[1] == 0 and logp[3] == 0 and entropy[1] == 0 and entropy[3] == 0
    assert grad[1].abs().sum() == 0 and grad[3].abs().sum() == 0
    assert grad[0].abs().sum() > 0
    r_logp, r_ent, r_grad = _run(logits, tokens, 1.0, "torch")
    torch.testing.assert_close(logp, r_logp)
    torch.testing.assert_close(grad.float(), r_grad.float(), atol=1e-6, rtol=2**-7)


def test_strided_view_of_batch_time_logits():
    # The learner passes logits[:, :-1] of a [B, T, V] model output: rows are not contiguous.
    full = _logits((2, 6, 333), torch.bfloat16)
    view = full[:, :-1]
    assert not view.is_contiguous()
    tokens = _tokens((2, 5), 333)
    k = _run(view, tokens, 0.9, "triton")
    r = _run(view.contiguous(), tokens, 0.9, "torch")
    assert k[0].shape == (2, 5) and k[2].shape == view.shape
    torch.testing.assert_close(k[0], r[0])
    torch.testing.assert_close(k[1], r[1])
    torch.testing.assert_close(k[2].float(), r[2].float(), atol=1e-6, rtol=2**-7)


@pytest.mark.parametrize("dtype,big", [(torch.float32, 1e30), (torch.bfloat16, 3e4), (torch.float16, 6e4)])
def test_extreme_logits_stay_finite(dtype, big):
    logits = _logits((3, 257), torch.float32)
    logits[0, 10] = big
    logits[1] = -big
    logits[1, 3] = big
    logits[2, :100] = -big
    logits[2, 100:] = float("-inf")
    logits[2, 0] = 0.0
    logits = logits.to(dtype)
    tokens = torch.tensor([10, 4, 0])
    logp, entropy, grad = _run(logits, tokens, 1.0, "triton")
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    oracle_logp, oracle_ent = token_logprobs_reference(logits.double(), tokens, 1.0, True)
    torch.testing.assert_close(logp.double(), oracle_logp, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), oracle_ent, atol=1e-6, rtol=1e-6)
    assert logp[0] == 0 and entropy[0] == 0  # the +big logit takes all the mass


def test_bf16_kernel_is_at_least_as_close_to_float64_as_eager_bf16():
    logits = _logits((16, 5003), torch.bfloat16, scale=4.0)
    tokens = _tokens((16,), 5003)
    temperature = 0.8
    weights = torch.linspace(-1, 1, 16)

    def loss_and_grad(fn, x):
        x = x.detach().clone().requires_grad_(True)
        logp = fn(x)
        (logp.float() * weights).sum().backward()
        return logp.detach().double(), x.grad.double()

    oracle = loss_and_grad(lambda x: token_logprobs_reference(x, tokens, temperature), logits.double())
    kernel = loss_and_grad(lambda x: token_logprobs(x, tokens, temperature, impl="triton"), logits)
    eager = loss_and_grad(lambda x: torch.log_softmax(x / temperature, -1).gather(1, tokens[:, None])[:, 0], logits)
    for k, e, o in zip(kernel, eager, oracle):
        k_err, e_err = (k - o).abs().max().item(), (e - o).abs().max().item()
        # Measured: logp 9.9e-7 (kernel) vs 1.1e-1 (eager bf16); grad 2.6e-3 vs 1.2e-2.
        assert k_err <= e_err, (k_err, e_err)


def test_qwen_vocabulary_two_rows():
    vocab = 151_936  # Qwen2.5-VL: not a power of two, 9.27 blocks of 16k
    logits = _logits((2, vocab), torch.bfloat16, seed=3)
    tokens = torch.tensor([vocab - 1, 75_000])
    k_logp, k_ent, k_grad = _run(logits, tokens, 1.0, "triton")
    r_logp, r_ent, r_grad = _run(logits, tokens, 1.0, "torch")
    torch.testing.assert_close(k_logp, r_logp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_ent, r_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_grad.float(), r_grad.float(), atol=1e-7, rtol=2**-7)


def test_only_logp_requested_and_only_entropy_used():
    logits = _logits((3, 50), torch.float32)
    tokens = _tokens((3,), 50)
    x = logits.clone().requires_grad_(True)
    logp = token_logprobs(x, tokens, impl="triton")
    assert isinstance(logp, torch.Tensor) and logp.shape == (3,)
    logp.sum().backward()
    y = logits.clone().requires_grad_(True)
    token_logprobs_reference(y, tokens).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)
    x.grad = None
    _, entropy = token_logprobs(x, tokens, return_entropy=True, impl="triton")
    entropy.sum().backward()
    y.grad = None
    token_logprobs_reference(y, tokens, return_entropy=True)[1].sum().backward()
    torch.testing.assert_close(x.grad, y.grad, atol=1e-6, rtol=1e-5)


def test_empty_batch():
    logits = torch.randn(0, 40, requires_grad=True)
    logp, entropy = token_logprobs(logits, torch.zeros(0, dtype=torch.long), return_entropy=True, impl="triton")
    assert logp.shape == (0,) and entropy.shape == (0,)
    logp.sum().backward()
    assert logits.grad.shape == (0, 40)


def test_reference_gradcheck_float64():
    logits = torch.randn(3, 11, dtype=torch.float64, requires_grad=True)
    tokens = torch.tensor([0, -100, 10])
    assert torch.autograd.gradcheck(lambda x: token_logprobs_reference(x, tokens, 0.7, True), (logits,))


def test_bad_inputs_are_named():
    logits = torch.randn(2, 10)
    with pytest.raises(ValueError, match="token 10 at flat position 1"):
        token_logprobs(logits, torch.tensor([3, 10]))
    with pytest.raises(ValueError, match="tokens has shape"):
        token_logprobs(logits, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integer"):
        token_logprobs(logits, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(logits, torch.tensor([1, 2]), temperature=0.0)
    with pytest.raises(ValueError, match="logits must be"):
        token_logprobs(torch.randn(10), torch.tensor([1]))
    with pytest.raises(TypeError, match="impl='torch'"):
        token_logprobs(logits.double(), torch.tensor([1, 2]), impl="triton")
    with pytest.raises(TypeError, match="int64"):
        token_logprobs(logits.to(torch.int64), torch.tensor([1, 2]), impl="torch")
