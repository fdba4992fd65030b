"""Compile Triton kernel launches for a real GPU target on a machine without a GPU, and read ptxas's report.

A stub driver that only reports `GPUTarget("cuda", arch, 32)` lets each kernel's `warmup(...)` run every
stage down to a cubin, through the ptxas that Triton ships and with Triton's own ptxas flags (`-v` among
them); the ptxas log gives registers, spills and stack per kernel, the PTX the widest global load.
`medvl_engine.kernels.compile_check` records the launches, runs this in clean subprocesses and checks
the results.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from unittest import mock

import torch

if TYPE_CHECKING:
    from medvl_engine.kernels.compile_check import Launch

KERNEL_MODULES = ("token_logprobs", "linear_token_logprobs", "group_advantages", "policy_loss")


def kernel_module(name: str):
    # The package re-exports each op under its module's name (`kernels.token_logprobs` is the function).
    return importlib.import_module(f"medvl_engine.kernels.{name}")


def jit_functions() -> dict[str, object]:
    """Every `@triton.jit` function defined in the kernel modules, by name (kernels and their helpers).

    Under TRITON_INTERPRET=1 they are interpreted functions; both forms keep the Python function in `.fn`.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for module_name in KERNEL_MODULES:
        module = kernel_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, JITFunction | InterpretedFunction) and value.fn.__module__ == module.__name__:
                found[name] = value
    return found


# -- compiling for a target with a stub driver ---------------------------------------------------------


class StubDriver:
    """The part of a Triton driver that compiling needs: a target and a device/stream number."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


class _PtxasLog:
    """Wraps `subprocess` inside Triton's NVIDIA compiler to keep each ptxas command and its `-v` log."""

    def __init__(self):
        self.calls: list[tuple[list[str], str]] = []

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def run(self, cmd, *args, **kwargs):
        result = subprocess.run(cmd, *args, **kwargs)
        stderr = kwargs.get("stderr")
        if "ptxas" in os.path.basename(str(cmd[0])) and hasattr(stderr, "name"):
            with open(stderr.name) as log:
                self.calls.append(([str(c) for c in cmd], log.read()))
        return result


def parse_ptxas_log(log: str) -> dict:
    """Registers, spill stores/loads and stack bytes from a `ptxas -v` log of one kernel."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spills and stack):
        raise ValueError(f"no register/spill report in the ptxas log:\n{log}")
    return {"registers": int(regs[1]), "spill_stores": int(spills[1]), "spill_loads": int(spills[2]),
            "stack_bytes": int(stack[1])}


_LOAD = re.compile(r"\bld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\b")


def widest_global_load(ptx: str) -> int:
    """Bits of the widest global load in the PTX (128 = a 16-byte vector load per thread)."""
    widths = [int(vec or 1) * int(bits) for vec, bits in _LOAD.findall(ptx)]
    return max(widths, default=0)


def _tool_version(path: str) -> str:
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+\.\d+)", out)
    return found[1] if found else "?"


def compile_launches(arch: int, launches: Sequence[Launch]) -> list[dict]:
    """Compile each launch for `arch` in this process (needs triton imported without the interpreter)."""
    import triton
    import triton.backends.nvidia.compiler as nvidia_compiler
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    from medvl_engine.kernels.dispatch import interpreter_active

    if interpreter_active():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1 in this process: it cannot compile; "
                           "use check(), which compiles in a clean subprocess")
    triton.runtime.driver.set_active(StubDriver(arch))
    backend = make_backend(GPUTarget("cuda", arch, 32))
    kernels = jit_functions()
    ptxas_log = _PtxasLog()
    versions: dict[str, str] = {}
    results = []
    with mock.patch.object(nvidia_compiler, "subprocess", ptxas_log):
        for launch in launches:
            row = {"arch": f"sm_{arch}", "kernel": launch.kernel, "config": launch.config, "covers": launch.covers,
                   "constexprs": {k: v for k, v in launch.kwargs.items() if k != "num_warps"},
                   "num_warps": launch.kwargs.get("num_warps", 4)}
            results.append(row)
            ptxas_log.calls.clear()
            start = time.perf_counter()
            try:
                compiled = kernels[launch.kernel].warmup(*launch.args, grid=(1,), **launch.kwargs)
                row["compile_s"] = round(time.perf_counter() - start, 3)
                if not ptxas_log.calls:
                    # Served from Triton's cache: put its PTX through ptxas again, as Triton's compiler does.
                    row["cached"] = True
                    backend.make_cubin(compiled.asm["ptx"], {}, backend.parse_options(compiled.metadata._asdict()),
                                       arch)
                cmd, log = ptxas_log.calls[-1]
                row.update(parse_ptxas_log(log))
            except Exception as error:  # noqa: BLE001 - every compile error is a finding to report
                row["error"] = f"{type(error).__name__}: {error}"[:2000]
                continue
            ptx = compiled.asm["ptx"]
            if cmd[0] not in versions:
                versions[cmd[0]] = _tool_version(cmd[0])
            ptx_version = re.search(r"^\.version (\d+\.\d+)", ptx, re.MULTILINE)
            row.update(shared_bytes=compiled.metadata.shared, widest_load_bits=widest_global_load(ptx),
                       ptx_version=ptx_version[1] if ptx_version else "?",
                       ptxas=f"{os.path.basename(cmd[0])} {versions[cmd[0]]}",
                       ptxas_flags=" ".join(c for c in cmd[1:] if c.startswith("-") and c != "-o"))
    return results
