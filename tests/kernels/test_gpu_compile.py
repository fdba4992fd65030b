"""Every Triton kernel, in every configuration its launcher uses, compiles for sm_90 and sm_80 without a GPU.

The compiling runs in `medvl_engine.kernels.compile_check` (one clean subprocess per target, since
this process may have imported triton under the interpreter); these tests read its report: no
compile error, no spill, registers within each kernel's budget, 128-bit loads where rows allow them.
`python -m medvl_engine.kernels.compile_check` prints the same report as a table.
"""

import importlib.util
import inspect

import pytest

from medvl_engine.kernels import compile_check, compile_target

pytestmark = pytest.mark.gpu_compile

needs_nvidia_backend = pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None,
                                          reason="this triton build has no NVIDIA backend (no ptxas)")

ROW_KERNELS = ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel", "_linear_token_logprobs_fwd_kernel",
               "_linear_token_logprobs_bwd_kernel")


@pytest.fixture(scope="module")
def report():
    report = compile_check.check(compile_check.TARGETS)
    workers_failed = [r["error"] for r in report["results"] if r["kernel"] == "*"]
    assert not workers_failed, "\n".join(workers_failed)
    return report


def _rows(report, kernel, arch):
    rows = [r for r in report["results"] if r["kernel"] == kernel and r["arch"] == f"sm_{arch}"]
    assert rows, f"{kernel} was not compiled for sm_{arch}"
    return rows


def test_every_jit_function_is_launched_or_called_by_a_launched_kernel():
    launched = {launch.kernel for launch in compile_check.launcher_launches()}
    functions = compile_target.jit_functions()
    helpers = set(functions) - launched
    for name in helpers:
        callers = [k for k in launched if f"{name}(" in inspect.getsource(functions[k].fn)]
        assert callers, f"@triton.jit {name} is neither launched by a launcher nor called from a launched kernel"
    assert launched == set(compile_check.REGISTER_BUDGETS), "every launched kernel needs a register budget"


@needs_nvidia_backend
@pytest.mark.parametrize("arch", compile_check.TARGETS)
@pytest.mark.parametrize("kernel", sorted(compile_check.REGISTER_BUDGETS))
def test_compiles_without_spills_within_its_register_budget(report, kernel, arch):
    failures = [f"[{r['config']}] {p}" for r in _rows(report, kernel, arch) for p in compile_check.problems(r)]
    assert not failures, f"{kernel} on sm_{arch}:\n" + "\n".join(failures)


@needs_nvidia_backend
@pytest.mark.parametrize("arch", compile_check.TARGETS)
def test_rows_that_are_multiples_of_16_elements_get_128_bit_loads(report, arch):
    element_bits = {"bf16": 16, "fp16": 16, "fp32": 32}
    for kernel in ROW_KERNELS:
        for row in _rows(report, kernel, arch):
            # A thread holds BLOCK_V / (32 * warps) consecutive elements: the last 384-column tile of the
            # fused op (block 512, 4 warps) has only 4 per thread, 64 bits in bf16.
            per_thread = row["constexprs"]["BLOCK_V"] // (32 * row["num_warps"])
            widest = min(128, per_thread * element_bits[row["config"].split()[0]])
            if f"V={compile_check.ODD_VOCAB}" in row["config"]:
                # 151,937 is not a multiple of 16: rows lose their 16-byte alignment and loads go scalar.
                assert row["widest_load_bits"] < 128, row
            else:
                assert row["widest_load_bits"] == widest, row


def test_ptxas_log_and_ptx_parsing():
    log = ("ptxas info    : Compiling entry function '_k' for 'sm_80'\nptxas info    : Function properties for _k\n"
           "    8 bytes stack frame, 12 bytes spill stores, 4 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 380 bytes cmem[0]\n")
    assert compile_target.parse_ptxas_log(log) == {"registers": 255, "spill_stores": 12, "spill_loads": 4,
                                                   "stack_bytes": 8}
    with pytest.raises(ValueError, match="no register"):
        compile_target.parse_ptxas_log("ptxas fatal   : Unresolved extern function")
    ptx = ("\tld.global.b64 { %rd6 }, [ %rd7 + 0 ];\n\t@%p3 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd17 + 0 ];\n"
           "\t@%p27 ld.global.L1::evict_last.b16 { %rs17 }, [ %rd19 + 0 ];\n")
    assert compile_target.widest_global_load(ptx) == 128
    assert compile_target.widest_global_load("\tld.global.b16 { %rs1 }, [ %rd1 + 0 ];") == 16


def test_problems_name_spills_budget_overruns_and_errors():
    row = {"kernel": "_policy_loss_bwd_kernel", "registers": 18, "spill_stores": 0, "spill_loads": 0}
    assert compile_check.problems(row) == []
    budget = compile_check.REGISTER_BUDGETS["_policy_loss_bwd_kernel"]
    assert compile_check.problems({**row, "registers": 200}) == [f"200 registers > budget {budget}"]
    assert compile_check.problems({**row, "spill_loads": 4}) == ["spills 0 B stored / 4 B loaded"]
    assert compile_check.problems({**row, "kernel": "_new_kernel"}) == [
        "no register budget for this kernel in REGISTER_BUDGETS"]
    assert compile_check.problems({"kernel": "_k", "error": "PTXASError: boom"}) == ["compile error: PTXASError: boom"]
