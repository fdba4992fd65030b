"""Triton kernels of the learner's hot path and their PyTorch reference twins.

Four ops, each one public function that runs Triton on CUDA tensors and the reference elsewhere
(`impl="auto"|"triton"|"torch"`, or the environment variable MEDVL_KERNEL_IMPL read at call time):
`token_logprobs`, `linear_token_logprobs`, `group_advantages`, `policy_loss`. The references live in
`medvl_engine.kernels.reference`; the seam in `medvl_engine.kernels.dispatch`.
"""

from medvl_engine.kernels.group_advantages import group_advantages
from medvl_engine.kernels.linear_token_logprobs import linear_token_logprobs
from medvl_engine.kernels.policy_loss import policy_loss
from medvl_engine.kernels.token_logprobs import token_logprobs

__all__ = ["group_advantages", "linear_token_logprobs", "policy_loss", "token_logprobs"]
