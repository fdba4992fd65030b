"""The one backend seam of every kernel: Triton or the PyTorch reference, chosen per call.

`impl="auto"` defers to the environment variable MEDVL_KERNEL_IMPL ("auto", "triton" or "torch"),
read at every call so a test or a job can flip it without re-importing anything; "auto" then means
Triton on CUDA tensors and the reference on anything else. Triton on CPU tensors runs the kernel
under Triton's interpreter, which Triton only offers when TRITON_INTERPRET=1 was set before triton
was first imported; the interpreter proves arithmetic, not GPU speed.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from medvl_engine.errors import ConfigError

IMPLS = ("auto", "triton", "torch")
ENV_VAR = "MEDVL_KERNEL_IMPL"


def resolve_impl(impl: str, *tensors: torch.Tensor | None, op: str) -> str:
    """Return "triton" or "torch" for one call of `op` on `tensors` (None entries are skipped)."""
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        impl = os.environ.get(ENV_VAR, "").strip() or "auto"
        if impl not in IMPLS:
            raise ConfigError(f"{op}: environment variable {ENV_VAR}={impl!r} is not one of {IMPLS}")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    device = devices.pop()
    if impl == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if impl == "triton" and device.type != "cuda":
        if device.type != "cpu" or not interpreter_active():
            raise RuntimeError(f"{op}: impl='triton' needs CUDA tensors, or CPU tensors under Triton's interpreter; "
                               f"got tensors on {device}. {_interpreter_hint()}")
    return impl


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its interpreter in this process.

    Triton decides when `triton.language` is first imported, from TRITON_INTERPRET at that moment:
    its own library functions (tl.sum, tl.zeros, ...) are then interpreted or compiled for good, so
    setting the variable later does not help.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.sum, InterpretedFunction)


def _interpreter_hint() -> str:
    if os.environ.get("TRITON_INTERPRET", "0").strip() == "1":
        return "TRITON_INTERPRET=1 is set, but only after triton was imported: set it before the first import."
    return "Set TRITON_INTERPRET=1 before triton is first imported."


def launchable(kernel, device: torch.device):
    """The form of a `@triton.jit` kernel to launch for `device`'s tensors.

    `triton.jit` fixes the form when the kernel's module is imported; if this package was imported
    after triton while TRITON_INTERPRET had since changed, a CPU launch gets an interpreted twin built
    from the same Python function (cached). On CUDA the kernel runs in whatever form Triton chose:
    under TRITON_INTERPRET=1 that is the interpreter, as Triton itself defines.
    """
    from triton.runtime.interpreter import InterpretedFunction

    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        return _interpreted_twin(kernel.fn)
    return kernel


@functools.cache
def _interpreted_twin(fn):
    from triton.runtime.interpreter import InterpretedFunction

    return InterpretedFunction(fn)


def block_size(length: int, device: torch.device, *, gpu_max: int, cpu_max: int = 16384) -> int:
    """Power-of-two block covering up to `length` elements, capped per device.

    The interpreter executes a block as one numpy call, so it wants the widest block it can get
    (log-softmax over 64x32000: 137 ms with 32k blocks, 1.2 s with 1k blocks); a GPU wants blocks
    that fit its registers.
    """
    cap = cpu_max if device.type == "cpu" else gpu_max
    return max(16, min(triton.next_power_of_2(max(length, 1)), cap))


def bf16_by_bits(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a kernel must round float32 -> bf16 itself (the BF16_RNE constexpr of the backward kernels).

    Triton's interpreter truncates float32 -> bf16 casts (measured: max error one full bf16 ulp
    instead of half), where a GPU and PyTorch round to nearest even; on the interpreter the kernels
    round by integer arithmetic on the bits instead, so CPU tests see the numbers a GPU produces.
    """
    return device.type == "cpu" and dtype == torch.bfloat16
