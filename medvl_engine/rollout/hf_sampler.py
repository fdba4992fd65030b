"""RequestSampler: token selection inside transformers `generate` with one random stream per request.

transformers samples a whole batch from the global RNG (`torch.multinomial`), so a request's answers
depend on what else shares its batch, and a reproducible request had to run alone. This sampler is
passed to `generate` as its only logits processor (with `do_sample=False`): it picks each row's token
itself and returns scores whose argmax is that token. Rows of one request draw from that request's
own `torch.Generator`, one uniform number per row and step, so its answers are a function of its seed
whatever else is in the batch (up to float rounding of the logits, which depends on the batch's shape).

Sampling is by inverse CDF: after temperature, top-k and top-p (transformers' order), the token is
the first whose cumulative weight `exp(logit - max)` exceeds `u * total` (`u` uniform in [0, 1),
cumulated in float64 by blocks, see `inverse_cdf`); a filtered token has weight 0 and can never be
chosen. That is an exact draw from the row's distribution, for one `exp` and one summing pass over
the vocabulary. The alternatives make a random number per vocabulary entry: transformers' `softmax` +
`torch.multinomial` (what plain `generate` does) and an exponential race (Gumbel-max, this sampler's
earlier method) each took ~35 ms per step for 16 rows x 49,152 ids (SmolLM2) on 2 CPU cores; this
whole sampler step (draw, log-probs, forced scores) takes ~7 ms there.

The log-prob of each chosen token, `log_softmax(logits / temperature)` before truncation, is taken in
the same pass (`logit - logsumexp`, the sum reused from the draw when nothing was truncated): one
[batch, vocab] float32 tensor per step lives at a time, instead of every step's logits kept to the
end (16 rows x 1024 steps x 151,936 Qwen ids x 4 bytes = 10 GB).
"""

from __future__ import annotations

import torch

# Inverse-CDF blocks: the draw sums the vocabulary per block, picks a block, then a token inside it.
_BLOCK = 256


class RequestSampler:
    """Picks the next token of every row; rows `[start, start + n)` belong to request j with `generators[j]`.

    `temperature == 0` is greedy (argmax; the generators are unused). `top_k == -1` and
    `top_p == 1.0` are off. `logprobs()` returns the chosen tokens' log-probs as [rows, steps].
    """

    def __init__(self, rows_per_request: list[int], generators: list[torch.Generator | None], *,
                 temperature: float, top_p: float = 1.0, top_k: int = -1, record_logprobs: bool = True):
        if len(rows_per_request) != len(generators):
            raise ValueError(f"RequestSampler: {len(rows_per_request)} requests but {len(generators)} generators")
        if temperature > 0 and any(g is None for g in generators):
            raise ValueError("RequestSampler: sampling (temperature > 0) needs a generator for every request")
        self.rows_per_request = list(rows_per_request)
        self.generators = list(generators)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.record_logprobs = record_logprobs
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] != sum(self.rows_per_request):
            raise ValueError(f"RequestSampler: {scores.shape[0]} rows in the batch, {sum(self.rows_per_request)} "
                             "expected")
        logits = scores.float()
        if self.temperature not in (0.0, 1.0):
            logits = logits / self.temperature
        if self.temperature == 0:
            chosen, normaliser = logits.argmax(dim=-1), None
        else:
            chosen, normaliser = self._sample(logits)
        if self.record_logprobs:
            if normaliser is None:
                normaliser = torch.logsumexp(logits, dim=-1)
            self._steps.append(logits.gather(1, chosen[:, None])[:, 0] - normaliser)
        # generate takes the argmax of what we return: 0 at the chosen token, -inf elsewhere.
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen[:, None], 0.0)

    def _sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The chosen token of every row, and the rows' logsumexp of `logits` when the draw computed it."""
        filtered = logits
        if self.top_k != -1 and self.top_k < logits.shape[-1]:
            kth = torch.topk(filtered, self.top_k, dim=-1).values[:, -1:]
            filtered = filtered.masked_fill(filtered < kth, float("-inf"))
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(filtered, descending=False)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= 1.0 - self.top_p
            drop[:, -1] = False  # the most likely token always stays
            filtered = filtered.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        peak = filtered.amax(dim=-1, keepdim=True)
        weights = torch.exp(filtered - peak)  # unnormalised probabilities; 0 for a filtered token
        uniform = torch.cat([
            torch.rand((n, 1), dtype=torch.float64, device=logits.device, generator=g)
            for n, g in zip(self.rows_per_request, self.generators)
        ])
        chosen, total = inverse_cdf(weights, uniform)
        if filtered is not logits:
            return chosen, None
        return chosen, peak[:, 0] + total.log().float()

    def logprobs(self) -> torch.Tensor:
        """[rows, steps] float32: the log-prob of the token chosen at each step."""
        if not self.record_logprobs:
            raise RuntimeError("RequestSampler: built with record_logprobs=False")
        if not self._steps:
            return torch.zeros((sum(self.rows_per_request), 0), dtype=torch.float32)
        return torch.stack(self._steps, dim=1)


def inverse_cdf(weights: torch.Tensor, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index whose cumulative weight exceeds `uniform * total` (an exact draw from the
    row's `weights`: >= 0, float32, [rows, vocab]; `uniform` float64 [rows, 1] in [0, 1)), and the
    total (float64 [rows]).

    Two levels instead of one float64 cumsum over the whole vocabulary (the cast and the sequential scan
    cost more than the rest of a step's sampling): float32 sums of 256-id blocks (each exact to its
    own rounding), a float64 cumsum over the blocks to pick one, then a float64 cumsum inside it. A
    token of weight 0 is never picked: every search returns the first entry strictly above its target,
    and each target is kept strictly below the total it searches in.
    """
    rows, vocab = weights.shape
    full = vocab // _BLOCK * _BLOCK
    sums = [weights[:, :full].reshape(rows, -1, _BLOCK).sum(dim=-1)] if full else []
    if full < vocab:
        sums.append(weights[:, full:].sum(dim=-1, keepdim=True))
    block_cdf = torch.cat(sums, dim=1).double().cumsum(dim=-1)
    total = block_cdf[:, -1:]
    target = torch.minimum(uniform * total, _below(total))
    block = torch.searchsorted(block_cdf, target, right=True)  # [rows, 1]
    before = torch.where(block > 0, block_cdf.gather(1, (block - 1).clamp_min(0)), 0.0)
    columns = block * _BLOCK + torch.arange(_BLOCK, device=weights.device)
    inside = torch.where(columns < vocab, weights.gather(1, columns.clamp_max(vocab - 1)), 0.0)
    within = inside.double().cumsum(dim=-1)
    residual = torch.minimum(target - before, _below(within[:, -1:]))
    return block[:, 0] * _BLOCK + torch.searchsorted(within, residual, right=True)[:, 0], total[:, 0]


def _below(x: torch.Tensor) -> torch.Tensor:
    """The largest float below each entry of `x` (> 0)."""
    return torch.nextafter(x, torch.zeros_like(x))
