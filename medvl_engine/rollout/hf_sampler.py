"""RequestSampler: token selection inside transformers `generate` with one random stream per request.

transformers samples a whole batch from the global RNG (`torch.multinomial`), so a request's answers
depend on what else shares its batch, and a reproducible request had to run alone. This sampler is
passed to `generate` as its only logits processor (with `do_sample=False`): it picks each row's token
itself and returns scores whose argmax is that token. Rows of one request draw from that request's
own `torch.Generator`, one draw per step, so its answers are a function of its seed whatever else is
in the batch (up to float rounding of the logits, which depends on the batch's shape).

Sampling is the exponential race: argmax(p / E) with E ~ Exp(1) per token is an exact draw from p
(the Gumbel-max trick; SGLang and vLLM sample the same way), applied after temperature, top-k and
top-p in transformers' order. The log-prob of each chosen token, `log_softmax(logits / temperature)`
before truncation, is taken in the same pass: one [batch, vocab] float32 tensor per step lives at a
time, instead of every step's logits kept to the end (16 rows x 1024 steps x 151,936 Qwen ids x 4
bytes = 10 GB).
"""

from __future__ import annotations

import torch


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
        logits = scores.float() if self.temperature == 0 else scores.float() / self.temperature
        chosen = logits.argmax(dim=-1) if self.temperature == 0 else self._sample(logits)
        if self.record_logprobs:
            self._steps.append(torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0])
        # generate takes the argmax of what we return: 0 at the chosen token, -inf elsewhere.
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, chosen[:, None], 0.0)

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
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
        probs = torch.softmax(filtered, dim=-1)
        race = torch.cat([
            torch.empty((n, logits.shape[-1]), dtype=torch.float32, device=logits.device).exponential_(generator=g)
            for n, g in zip(self.rows_per_request, self.generators)
        ])
        # An Exp(1) draw of exactly 0 would make 0 / 0 = NaN, which argmax picks, for a filtered token.
        return (probs / race.clamp_min_(torch.finfo(torch.float32).tiny)).argmax(dim=-1)

    def logprobs(self) -> torch.Tensor:
        """[rows, steps] float32: the log-prob of the token chosen at each step."""
        if not self.record_logprobs:
            raise RuntimeError("RequestSampler: built with record_logprobs=False")
        if not self._steps:
            return torch.zeros((sum(self.rows_per_request), 0), dtype=torch.float32)
        return torch.stack(self._steps, dim=1)
