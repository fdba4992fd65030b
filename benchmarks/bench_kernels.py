"""Benchmark of the four kernels against their PyTorch references: time, bandwidth, peak memory.

On a GPU it measures the shapes of issue 3 (N in {4k, 16k, 64k} tokens, V = 151,936, H in {2048,
3584}, bf16) and reports each op against the reference and against the device-to-device copy
bandwidth measured in the same run. On a CPU it runs small shapes through the reference path; with
`--interpret` it also runs the Triton path under TRITON_INTERPRET=1, which proves the kernels run
and says nothing about their speed.

    python benchmarks/bench_kernels.py                       # GPU: full shapes; CPU: reference, small
    python benchmarks/bench_kernels.py --interpret           # CPU: + Triton under the interpreter
    python benchmarks/bench_kernels.py --out results.jsonl   # one JSON row per measurement
    python benchmarks/bench_kernels.py --rows 16384          # GPU: only N = 16k tokens

On a GPU each time is the median of `triton.testing.do_bench` (CUDA events, L2 flushed between runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interpret", action="store_true",
                        help="CPU only: also time the Triton path under Triton's interpreter (TRITON_INTERPRET=1)")
    parser.add_argument("--small", action="store_true", help="small shapes even on a GPU")
    parser.add_argument("--repeats", type=int, default=5, help="CPU timing runs (a GPU uses do_bench's own count)")
    parser.add_argument("--rows", type=int, nargs="+", default=None,
                        help="GPU: token counts N of the log-prob benchmarks (default 4096 16384 65536; the fused "
                             "linear op takes those <= 16384)")
    parser.add_argument("--out", default=None,
                        help="JSON-lines output (default: benchmarks/results/kernels-<device>.jsonl on a GPU, "
                             "the temp folder on a CPU: results/ holds GPU measurements only)")
    return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.interpret:
    # Must precede the first import of triton's kernels (triton.jit reads it when a kernel is defined).
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from medvl_engine.benchmarking import device_name, format_table, median_time, write_rows  # noqa: E402
from medvl_engine.kernels import group_advantages, linear_token_logprobs, policy_loss, token_logprobs  # noqa: E402

# The "torch" impl of each op is its reference twin; the loop is verl's estimator, a baseline only.
from medvl_engine.kernels.reference import group_advantages_loop, group_advantages_reference  # noqa: E402

VOCAB = 151_936


class Bench:
    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats, self.rows = device, repeats, []
        self.copy_gbps = self._copy_bandwidth()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def time(self, fn, repeats=None) -> float:
        """Median seconds of `fn()`; on a GPU by do_bench unless a repeat count is forced (slow baselines)."""
        if self.device.type == "cuda" and repeats is None:
            import triton.testing

            return triton.testing.do_bench(fn, return_mode="median") / 1e3

        def run():
            fn()
            self.sync()
        return median_time(run, repeats=repeats or self.repeats, warmup=1)

    def peak_mb(self, fn) -> float:
        """Peak memory allocated above what was live before `fn` (CUDA only)."""
        if self.device.type != "cuda":
            return float("nan")
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        self.sync()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def _copy_bandwidth(self) -> float:
        size = 2**30 if self.device.type == "cuda" else 2**26
        src = torch.empty(size, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        seconds = self.time(lambda: dst.copy_(src))
        return 2 * size / seconds / 1e9  # read + write

    def add(self, op, impl, shape, seconds, *, moved_bytes=None, reference_s=None, peak_mb=float("nan"), **extra):
        row = {"op": op, "impl": impl, "shape": shape, "ms": seconds * 1e3, "peak_mb": peak_mb, **extra}
        if moved_bytes is not None:
            row["GB/s"] = moved_bytes / seconds / 1e9
            row["of_copy_bw"] = row["GB/s"] / self.copy_gbps
        if reference_s is not None:
            row["speedup_vs_ref"] = reference_s / seconds
        self.rows.append(row)


def impls(bench: Bench, interpret: bool) -> list[str]:
    """The reference first: the Triton rows carry their ratio to it."""
    return ["torch", "triton"] if bench.device.type == "cuda" or interpret else ["torch"]


def _token_logprobs_times(bench: Bench, logits, tokens, impl):
    """(forward s, backward s, peak MB of forward + backward) of one impl."""
    x = logits.detach().requires_grad_(True)

    def forward():
        return token_logprobs(x, tokens, impl=impl)

    logp = forward()
    grad_out = torch.ones_like(logp)
    forward_s = bench.time(forward)
    backward_s = bench.time(lambda: torch.autograd.grad(logp, x, grad_out, retain_graph=True))
    peak = bench.peak_mb(lambda: torch.autograd.grad(forward(), x, grad_out))
    return forward_s, backward_s, peak


def bench_token_logprobs(bench: Bench, rows_list, vocab, dtype, interpret):
    for rows in rows_list:
        shape = f"N={rows} V={vocab} {str(dtype).removeprefix('torch.')}"
        logits = torch.randn(rows, vocab, device=bench.device).to(dtype)
        tokens = torch.randint(0, vocab, (rows,), device=bench.device)
        read = rows * vocab * logits.element_size()
        ref_fwd = ref_bwd = None
        for impl in impls(bench, interpret):
            try:
                fwd_s, bwd_s, peak = _token_logprobs_times(bench, logits, tokens, impl)
            except torch.OutOfMemoryError:
                bench.rows.append({"op": "token_logprobs", "impl": impl, "shape": shape, "ms": "oom"})
                torch.cuda.empty_cache()
                continue
            if impl == "torch":
                ref_fwd, ref_bwd = fwd_s, bwd_s
            bench.add("token_logprobs fwd", impl, shape, fwd_s, moved_bytes=read, reference_s=ref_fwd)
            # The backward reads the logits and writes their gradient.
            bench.add("token_logprobs bwd", impl, shape, bwd_s, moved_bytes=2 * read, reference_s=ref_bwd,
                      peak_mb=peak)
        del logits


def bench_linear(bench: Bench, rows_list, hidden_sizes, vocab, dtype, interpret, chunk):
    for rows in rows_list:
        for hidden_size in hidden_sizes:
            shape = f"N={rows} H={hidden_size} V={vocab} {str(dtype).removeprefix('torch.')}"
            hidden = torch.randn(rows, hidden_size, device=bench.device).to(dtype)
            weight = (torch.randn(vocab, hidden_size, device=bench.device) * hidden_size**-0.5).to(dtype)
            tokens = torch.randint(0, vocab, (rows,), device=bench.device)
            # The matmuls any path must do: logits, then grad_hidden and grad_weight from grad_logits.
            logits = hidden @ weight.T
            matmul_s = bench.time(lambda h=hidden, w=weight, z=logits: (h @ w.T, z @ w, z.T @ h))
            del logits
            ref_s = None
            for impl in impls(bench, interpret):
                h = hidden.detach().requires_grad_(True)
                w = weight.detach().requires_grad_(True)

                def step(impl=impl, h=h, w=w, tokens=tokens):
                    return torch.autograd.grad(linear_token_logprobs(h, w, tokens, chunk=chunk, impl=impl).sum(),
                                               (h, w))
                try:
                    seconds = bench.time(step)
                    peak = bench.peak_mb(step)
                except torch.OutOfMemoryError:
                    bench.rows.append({"op": "linear_token_logprobs", "impl": impl, "shape": shape, "ms": "oom"})
                    torch.cuda.empty_cache()
                    continue
                if impl == "torch":
                    ref_s = seconds
                bench.add("linear_token_logprobs fwd+bwd", impl, shape, seconds, reference_s=ref_s, peak_mb=peak,
                          of_matmuls=seconds / matmul_s)


def bench_group_advantages(bench: Bench, size, groups, interpret):
    shape = f"M={size} groups={groups}"
    rewards = torch.randint(0, 2, (size,), device=bench.device).float()
    index = torch.randperm(size, device=bench.device) % groups
    loop_s = bench.time(lambda: group_advantages_loop(rewards, index), repeats=1)
    bench.add("group_advantages", "python loop (verl)", shape, loop_s)
    ref_s = bench.time(lambda: group_advantages_reference(rewards, index))
    bench.add("group_advantages", "torch", shape, ref_s, speedup_vs_loop=loop_s / ref_s)
    if "triton" in impls(bench, interpret):
        seconds = bench.time(lambda: group_advantages(rewards, index, impl="triton"))
        bench.add("group_advantages", "triton", shape, seconds, reference_s=ref_s, speedup_vs_loop=loop_s / seconds)


def bench_policy_loss(bench: Bench, rows, seq_len, interpret):
    shape = f"B={rows} T={seq_len} fp32"
    logp = torch.randn(rows, seq_len, device=bench.device) * 0.3 - 1
    old = logp + torch.randn_like(logp) * 0.1
    ref = logp + torch.randn_like(logp) * 0.1
    adv = torch.randn(rows, device=bench.device)
    mask = torch.rand(rows, seq_len, device=bench.device) > 0.2
    # One read of logp, old_logp, ref_logp, mask and one write of the gradient.
    moved = logp.numel() * (4 * 4 + 1)
    ref_s = None
    for impl in impls(bench, interpret):
        x = logp.detach().requires_grad_(True)

        def step(impl=impl, x=x):
            loss, _ = policy_loss(x, old, adv, mask, ref, 0.2, 0.28, 0.01, impl=impl)
            return torch.autograd.grad(loss, x)
        seconds = bench.time(step)
        if impl == "torch":
            ref_s = seconds
        bench.add("policy_loss fwd+bwd", impl, shape, seconds, moved_bytes=moved, reference_s=ref_s,
                  peak_mb=bench.peak_mb(step))


def main(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.interpret and device.type == "cuda":
        print("--interpret is for CPU machines; on a GPU the Triton path runs compiled", file=sys.stderr)
        return 2
    bench = Bench(device, args.repeats)
    full = device.type == "cuda" and not args.small
    if full:
        rows = args.rows or [4096, 16384, 65536]
        bench_token_logprobs(bench, rows, VOCAB, torch.bfloat16, False)
        bench_linear(bench, [n for n in rows if n <= 16384], [2048, 3584], VOCAB, torch.bfloat16, False, chunk=4096)
        bench_group_advantages(bench, 1 << 20, 1 << 16, False)
        bench_policy_loss(bench, 512, 4096, False)
    else:
        # Small enough for the interpreter: it runs one program at a time in numpy.
        bench_token_logprobs(bench, [8], 8192, torch.bfloat16, args.interpret)
        bench_linear(bench, [32], [64], 2048, torch.float32, args.interpret, chunk=1024)
        bench_group_advantages(bench, 4096, 512, args.interpret)
        bench_policy_loss(bench, 8, 256, args.interpret)
    columns = ["op", "impl", "shape", "ms", "GB/s", "of_copy_bw", "speedup_vs_ref", "speedup_vs_loop", "of_matmuls",
               "peak_mb"]
    print(f"device: {device_name()}   device-to-device copy: {bench.copy_gbps:.1f} GB/s")
    print(format_table(bench.rows, columns))
    tag = "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()
    folder = "benchmarks/results" if device.type == "cuda" else tempfile.gettempdir()
    out = write_rows(args.out or os.path.join(folder, f"kernels-{tag}.jsonl"), bench.rows)
    print(f"wrote {len(bench.rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
