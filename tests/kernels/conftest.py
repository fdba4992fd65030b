"""Kernel tests run the Triton kernels on CPU tensors under Triton's interpreter.

Triton chooses interpreter or compiler once, when it is first imported, from TRITON_INTERPRET; this
file sets it at import (setdefault: a run that chose a value keeps it) before any test module
imports triton, and only on a machine without CUDA, where no compiled Triton kernel could run
anyway, so other tests in the same process lose nothing. Tests that launch Triton on CPU tensors
use the `interpreter` fixture, which skips them when Triton was imported without the interpreter
(a GPU machine, or another module imported triton first); there the `gpu` tests run the compiled kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from medvl_engine.kernels.dispatch import interpreter_active  # noqa: E402


@pytest.fixture
def interpreter():
    if not interpreter_active():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1: no Triton launches on CPU tensors")


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")
