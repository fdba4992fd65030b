"""The policy's output projection, able to return answer-token log-probs instead of logits.

The learner needs the log-prob (and entropy) of each answer token, never the [B, L, V] logits, which at
V = 151,936 are the largest tensors of a step (5 GB of bf16 logits at 16k tokens, more for their float32
copies and gradients). `install_fused_head(model)` replaces `model.lm_head` by a `FusedLogprobHead`
holding the same Parameter (a tied embedding stays tied, the state-dict key stays `lm_head.weight`).
Outside a request it is the plain `nn.Linear`, so generation and export see the model they always saw;
inside one it computes `linear_token_logprobs` on the answer rows only:

    head = install_fused_head(model)                      # before DeepSpeed wraps the model
    with head.logprobs(targets, mask, temperature=1.0, return_entropy=True):
        out = model(input_ids=..., attention_mask=...).logits   # [B, L-1, 2]: log-prob, entropy

The projection stays inside the head's own `forward` (the way Liger-Kernel patches a model, minus the
forward rewrite), because that is where ZeRO-3 gathers the weight: its pre-forward hook gathers it for
the forward and its pre-backward hook, fired when the gradient reaches the head's output, gathers it
again for the backward. The model's forward runs unchanged, so one head serves Llama, Qwen2 and
Qwen2.5-VL alike: each calls `self.lm_head(hidden_states)` on its final hidden states. The learner
leaves `logits_to_keep` at 0 so the head sees all L positions and picks the answer rows from the mask
itself.

On CUDA the op runs the Triton kernel, which tiles rows and vocabulary itself. Elsewhere (where the
kernel's seam would pick its PyTorch reference, which materialises the [rows, V] logits) the head runs
`BlockwiseLinearLogprobs`: the kernel's arithmetic in PyTorch ops on blocks of rows no bigger than one
chunk x chunk tile, recomputed in the backward, so the extra memory stays a few tiles whatever the batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from medvl_engine.kernels import linear_token_logprobs
from medvl_engine.kernels.dispatch import resolve_impl
from medvl_engine.kernels.linear_token_logprobs import DEFAULT_CHUNK

_OP = "linear_token_logprobs"


@dataclass(frozen=True)
class LogprobRequest:
    """What the next forward of the head computes: log-probs of `targets` where `mask` is true."""

    targets: torch.Tensor  # [B, L-1] int64: the token at position t + 1
    mask: torch.Tensor  # [B, L-1] bool: positions whose log-prob is wanted
    temperature: float
    return_entropy: bool


class FusedLogprobHead(nn.Linear):
    """`nn.Linear` without bias over a borrowed weight; inside `logprobs(...)` its forward returns log-probs.

    A subclass of `nn.Linear` so code that inspects the output embeddings (resizing, tying, export)
    keeps working; `__init__` takes the existing layer and shares its Parameter, allocating nothing.
    """

    def __init__(self, linear: nn.Linear, *, chunk: int = DEFAULT_CHUNK):
        if linear.bias is not None:
            raise ValueError("FusedLogprobHead: the output projection has a bias, which linear_token_logprobs "
                             "does not take; use the logits path")
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", None)
        self.chunk = chunk
        self._request: LogprobRequest | None = None

    @contextlib.contextmanager
    def logprobs(self, targets: torch.Tensor, mask: torch.Tensor, *, temperature: float = 1.0,
                 return_entropy: bool = False):
        """While open, `forward(hidden [B, L, H])` returns [B, L-1, 1] log-probs (2: + entropy), 0 off `mask`."""
        if self._request is not None:
            raise RuntimeError("FusedLogprobHead.logprobs: a request is already open on this head")
        if targets.shape != mask.shape or targets.dim() != 2:
            raise ValueError(f"FusedLogprobHead.logprobs: targets {tuple(targets.shape)} and mask "
                             f"{tuple(mask.shape)} must be the same [B, L-1] shape")
        self._request = LogprobRequest(targets, mask.bool(), float(temperature), bool(return_entropy))
        try:
            yield self
        finally:
            self._request = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        request = self._request
        if request is None:
            return super().forward(hidden)
        batch, positions = request.mask.shape
        if hidden.dim() != 3 or hidden.shape[:2] != (batch, positions + 1):
            raise ValueError(f"FusedLogprobHead: hidden states {tuple(hidden.shape)} do not cover the request's "
                             f"{batch} x {positions + 1} positions (was the model called with logits_to_keep?)")
        logp, entropy = masked_linear_logprobs(hidden, self.weight, request.targets, request.mask,
                                               request.temperature, request.return_entropy, chunk=self.chunk)
        # One tensor out: ZeRO-3 hooks the module's output tensors for the pre-backward gather, and the
        # model's forward passes whatever the head returns through as `logits`.
        return torch.stack([logp, entropy], -1) if entropy is not None else logp.unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused log-probs (chunk={self.chunk})"


def install_fused_head(model: nn.Module, *, chunk: int = DEFAULT_CHUNK) -> FusedLogprobHead:
    """Swap `model`'s output projection for a `FusedLogprobHead` on the same Parameter (idempotent).

    Call it before DeepSpeed wraps the model (its ZeRO-3 hooks attach to the modules present then) and
    before the reference is copied from the policy (the copy then carries its own head).
    """
    head = model.get_output_embeddings()
    if isinstance(head, FusedLogprobHead):
        return head
    if type(head) is not nn.Linear:
        raise TypeError(f"install_fused_head: the output projection of {type(model).__name__} is "
                        f"{type(head).__name__}, not an nn.Linear")
    fused = FusedLogprobHead(head, chunk=chunk)
    model.set_output_embeddings(fused)
    if model.get_output_embeddings() is not fused:
        raise RuntimeError(f"install_fused_head: {type(model).__name__}.set_output_embeddings did not take the head")
    return fused


def fused_head(model: nn.Module) -> FusedLogprobHead | None:
    """The installed head of `model` (a DeepSpeed engine or the bare model), or None."""
    module = getattr(model, "module", model)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    return head if isinstance(head, FusedLogprobHead) else None


def masked_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                           temperature: float = 1.0, return_entropy: bool = False, *, chunk: int = DEFAULT_CHUNK):
    """Log-probs [B, L-1] (and entropy) of `targets` from hidden states [B, L, H] where `mask` is true.

    Position t of `hidden` predicts `targets[:, t]`; the last position predicts nothing. Only the rows
    under `mask` reach the vocabulary projection; the others are 0 in the float32 outputs and get no
    gradient.
    """
    rows = hidden[:, :-1][mask]
    tokens = targets[mask]
    logp_rows, entropy_rows = _rows_logprobs(rows, weight, tokens, temperature, return_entropy, chunk)
    logp = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, logp_rows)
    if entropy_rows is None:
        return logp, None
    entropy = torch.zeros(mask.shape, dtype=torch.float32, device=hidden.device).masked_scatter(mask, entropy_rows)
    return logp, entropy


def _rows_logprobs(rows, weight, tokens, temperature, return_entropy, chunk):
    impl = resolve_impl("auto", rows, weight, tokens, op=_OP)
    if impl == "triton":
        out = linear_token_logprobs(rows, weight, tokens, temperature, chunk, return_entropy, impl="triton")
        return out if return_entropy else (out, None)
    # Not the reference (it holds [rows, V] logits and their autograd graph, ~6 tensors that size) but
    # the same arithmetic in row blocks of one chunk x chunk tile: 110 rows, 64 MB of float32 at
    # V = 151,936 and chunk 4096.
    block = max(1, chunk * chunk // weight.shape[0])
    logp, entropy = BlockwiseLinearLogprobs.apply(rows, weight, tokens.long(), float(temperature), block,
                                                  bool(return_entropy))
    return logp, (entropy if return_entropy else None)


# Vocabulary rows per partial product of the hidden-state gradient. One float32 GEMM over all 151,936
# rows measured 2.2e-5 from float64 (AVX2, AVX-512 and the default path alike), and MKL's 2-thread path
# for [5, 8192] @ [8192, 64] is 10x further off than its 1-thread one; partial products of 1,024 rows
# summed in float64 measured 1.1e-6 on every path and thread count (a float64 GEMM: 8.5e-7), against
# 3-8e-6 for the reference's autograd GEMM.
_VOCAB_CHUNK = 1024


def _grad_hidden(dz: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dz [R, V] (float32) @ weight [V, H], float32 partial products over vocabulary chunks summed in float64."""
    out = torch.zeros(dz.shape[0], weight.shape[1], dtype=torch.float64, device=dz.device)
    for v0 in range(0, weight.shape[0], _VOCAB_CHUNK):
        out += (dz[:, v0:v0 + _VOCAB_CHUNK] @ weight[v0:v0 + _VOCAB_CHUNK].float()).double()
    return out


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 `(hidden @ weight.T) / temperature` of one row block, as the reference rounds it."""
    z = (hidden @ weight.T).float()  # a bf16 matmul rounds to bf16 first, like the eager path
    return z.div_(temperature) if temperature != 1.0 else z


class BlockwiseLinearLogprobs(torch.autograd.Function):
    """`linear_token_logprobs` in PyTorch ops, a block of rows at a time: the head's path off CUDA.

    hidden [N, H], weight [V, H], tokens [N] (all >= 0: the head passes only answer rows). The forward
    keeps per-row log-sum-exp and entropy; the backward recomputes each block's logits and turns them in
    place into their gradient, d logp / dz = onehot - p and d entropy / dz = -p (log p + entropy), as
    the Triton kernel does per tile. One pass of each elementwise op per block where autograd through
    a checkpointed reference runs the whole graph twice: forward+backward with entropy at 640 rows x
    V = 151,936, H = 64 took 2.0 s / 4.1 s (two runs on 2 busy CPU cores) against 5.5 s / 10.3 s for the
    reference checkpointed block by block and 3.2 s / 5.1 s for the unblocked reference.
    """

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, block, return_entropy):
        rows = hidden.shape[0]
        logp = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logp)
        entropy = torch.empty_like(logp) if return_entropy else logp.new_empty(0)
        for r0 in range(0, rows, block):
            r1 = min(r0 + block, rows)
            z = _scaled_logits(hidden[r0:r1], weight, temperature)
            lse[r0:r1] = block_lse = torch.logsumexp(z, dim=-1)
            logp[r0:r1] = z.gather(1, tokens[r0:r1, None])[:, 0] - block_lse
            if return_entropy:
                log_q = z.sub_(block_lse[:, None])
                # torch.sum's cascade keeps the 151,936-term sum at 1e-6; a batched dot product (bmm)
                # measured 1.4e-3 from float64.
                entropy[r0:r1] = -log_q.exp().mul_(log_q).sum(-1)
        ctx.save_for_backward(hidden, weight, tokens, lse, entropy)
        ctx.temperature, ctx.block, ctx.return_entropy = temperature, block, return_entropy
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        temperature = ctx.temperature
        if not ctx.return_entropy:
            grad_entropy = None
        rows = hidden.shape[0]
        # The 1/T of dz / dlogits folded into the per-row scales.
        g_logp = (grad_logp.float() / temperature if grad_logp is not None
                  else torch.zeros(rows, dtype=torch.float32, device=hidden.device))
        g_entropy = None if grad_entropy is None else grad_entropy.float() / temperature
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # float32 accumulator: the sum over row blocks would lose ~3 bits per doubling in bf16.
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        for r0 in range(0, rows, ctx.block):
            r1 = min(r0 + ctx.block, rows)
            h = hidden[r0:r1]
            log_q = _scaled_logits(h, weight, temperature).sub_(lse[r0:r1, None])
            g = g_logp[r0:r1, None]
            if g_entropy is None:
                dz = log_q.exp_().mul_(-g)  # -g p
            else:
                p = log_q.exp()
                # -p (g_logp + g_entropy (log p + entropy)), in place over log_q
                dz = log_q.add_(entropy[r0:r1, None]).mul_(g_entropy[r0:r1, None]).add_(g).mul_(p).neg_()
                del p
            dz.scatter_add_(1, tokens[r0:r1, None], g)
            if need_hidden:
                grad_hidden[r0:r1] = _grad_hidden(dz, weight).to(hidden.dtype)
            if need_weight:
                grad_weight.addmm_(dz.T, h.float())
        return (grad_hidden, grad_weight.to(weight.dtype) if need_weight else None, None, None, None, None)
