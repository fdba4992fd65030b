"""The backend seam: impl keyword, MEDVL_KERNEL_IMPL read at call time, and the interpreter gate."""

import pytest
import torch

from medvl_engine.kernels import dispatch, group_advantages, policy_loss, token_logprobs
from medvl_engine.kernels.dispatch import ENV_VAR, resolve_impl


def _ran_triton(logp: torch.Tensor) -> bool:
    return type(logp.grad_fn).__name__.startswith("TokenLogprobs")


def test_auto_is_reference_on_cpu_and_env_is_read_per_call(monkeypatch, interpreter):
    logits = torch.randn(3, 20, requires_grad=True)
    tokens = torch.tensor([1, 2, 3])
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert not _ran_triton(token_logprobs(logits, tokens))
    monkeypatch.setenv(ENV_VAR, "triton")
    assert _ran_triton(token_logprobs(logits, tokens))
    assert not _ran_triton(token_logprobs(logits, tokens, impl="torch"))  # the argument wins over the variable
    monkeypatch.setenv(ENV_VAR, "torch")
    assert not _ran_triton(token_logprobs(logits, tokens))
    assert _ran_triton(token_logprobs(logits, tokens, impl="triton"))


def test_resolve_rules(monkeypatch, interpreter):
    cpu = torch.zeros(1)
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_impl("auto", cpu, None, op="x") == "torch"
    assert resolve_impl("triton", cpu, op="x") == "triton"
    with pytest.raises(ValueError, match="impl='cuda'"):
        resolve_impl("cuda", cpu, op="x")
    monkeypatch.setenv(ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{ENV_VAR}='fast'"):
        resolve_impl("auto", cpu, op="x")
    with pytest.raises(ValueError, match="one device"):
        resolve_impl("torch", cpu, torch.zeros(1, device="meta"), op="x")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # Stands in for a process that imported triton without TRITON_INTERPRET=1 (decided once, at import).
    monkeypatch.setattr(dispatch, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), impl="triton")


@pytest.mark.gpu
def test_cuda_kernels_match_references(cuda):
    # Qwen2.5-VL's vocabulary, bf16 logits: the shape the learner runs.
    gen = torch.Generator(device=cuda).manual_seed(0)
    logits = (torch.randn(2, 65, 151_936, device=cuda, generator=gen) * 3).bfloat16()[:, :-1]
    tokens = torch.randint(0, 151_936, (2, 64), device=cuda, generator=gen)
    tokens[0, :5] = -100
    outs = {}
    for impl in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        logp, entropy = token_logprobs(x, tokens, 0.9, return_entropy=True, impl=impl)
        (logp.sum() + 0.3 * entropy.sum()).backward()
        outs[impl] = (logp, entropy, x.grad.float())
    for k, r in zip(outs["triton"], outs["torch"]):
        torch.testing.assert_close(k, r, atol=1e-4, rtol=2**-7)

    rewards = torch.rand(4096, device=cuda)
    index = torch.randperm(4096, device=cuda) % 512
    for mode in ("grpo", "drgrpo", "rloo"):
        a, c = group_advantages(rewards, index, mode, impl="triton")
        ra, rc = group_advantages(rewards, index, mode, impl="torch")
        torch.testing.assert_close(a, ra, atol=1e-5, rtol=1e-4)
        assert torch.equal(c, rc)

    logp = torch.randn(16, 300, device=cuda) * 0.3 - 1
    old = logp + torch.randn_like(logp) * 0.2
    ref = logp + torch.randn_like(logp)
    mask = torch.rand_like(logp) > 0.2
    adv = torch.randn(16, device=cuda)
    res = {}
    for impl in ("triton", "torch"):
        x = logp.clone().requires_grad_(True)
        loss, metrics = policy_loss(x, old, adv, mask, ref, 0.2, 0.28, 0.05, impl=impl)
        loss.backward()
        res[impl] = (loss, x.grad, *metrics.values())
    for k, r in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(k, r, atol=1e-6, rtol=1e-5)
