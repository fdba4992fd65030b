"""Peak memory and time of one learner forward+backward: fused log-probs against the logits path.

A random Llama with Qwen2.5's vocabulary (V = 151,936) and a tiny body goes through `Learner.build`
(DeepSpeed, ZeRO stage 0 by default) and runs `response_logprobs` + `backward` on one micro-batch of
right-padded prompt+answer rows, once per path: `fused` (answer rows of the final hidden states
through `linear_token_logprobs`, the default) and `logits` (the [B, L, V] logits, then `token_logprobs`),
each with and without the entropy term (`--entropy`).

    python benchmarks/bench_learner.py                          # CPU: hidden 64, fp32
    python benchmarks/bench_learner.py --hidden 3584 --dtype bf16   # GPU: Qwen2.5-7B's hidden size
    python benchmarks/bench_learner.py --answers 448 448 --prompt 64   # answer-heavy rows
    python benchmarks/bench_learner.py --vocab 512 --prompt 8 --answers 8 4 --repeats 1 --entropy off   # smoke test
    python benchmarks/bench_learner.py --answers 512 64 256 96 --packed   # answers varying 8x: padded vs packed

`--packed` adds a third path, `packed`: the fused path with the micro-batch's rows end to end in one row
without padding (`model.packing`; on the CPU SDPA masks it with a [T, T] block-diagonal mask, on a GPU with
flash-attention it is varlen). `tokens_per_s` counts the real (unpadded) tokens of the micro-batch.

Memory: each configuration runs in its own child process, so one path's allocator state never
flatters the other, and reports the extra peak above what is live before the step: on a GPU
`max_memory_allocated` minus `memory_allocated`; on a CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs) minus the resident set before the step, after a warm-up step (parameter
gradients exist, as in training) and `malloc_trim` (freed heap pages are not counted as free room).
Time: one more child per entropy setting alternates the two paths step by step, `--repeats` times
each, so both see the same background load; `ms` is the fastest step (the least disturbed on a shared
machine), `ms_median` the median. Prints a table and writes one JSON row per configuration (`--out`;
by default benchmarks/results/ on a GPU, the temp folder on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

VOCAB = 151_936
PATHS = ("logits", "fused")
PACKED_PATHS = ("logits", "fused", "packed")
ENTROPY = {"both": (False, True), "off": (False,), "on": (True,)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (CPU: tiny; GPU: e.g. 3584)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens of every row")
    parser.add_argument("--answers", type=int, nargs="+", default=[384, 256],
                        help="answer tokens of each row (one row per value; the shorter ones are padded)")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on a GPU, else fp32")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each path")
    parser.add_argument("--entropy", choices=tuple(ENTROPY), default="both",
                        help="measure the step without the entropy term (off), with it (on) or both; every setting "
                             "costs three child processes")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--packed", action="store_true", help="also the packed path (no padding)")
    parser.add_argument("--out", default=None, help="JSON-lines output")
    parser.add_argument("--child", nargs=3, metavar=("MODEL_DIR", "MODE", "ENTROPY"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- the parent: a model folder, one child per configuration, the table -----------------------------


def save_random_llama(folder: Path, vocab: int, hidden: int, layers: int) -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=True,
                         max_position_embeddings=4096, pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(folder)
    words = {"<pad>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(vocab - 2)}}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
                            eos_token="</s>", pad_token="<pad>").save_pretrained(folder)
    return folder


def run_child(args: argparse.Namespace, model_dir: Path, mode: str, entropy: bool) -> dict:
    """`mode` is a path name (measure its memory) or "time" (time both paths, interleaved)."""
    argv = [sys.executable, __file__, "--child", str(model_dir), mode, str(int(entropy)),
            "--prompt", str(args.prompt), "--answers", *map(str, args.answers), "--zero-stage", str(args.zero_stage),
            "--repeats", str(args.repeats), "--threads", str(args.threads)] + (["--packed"] if args.packed else [])
    if args.dtype:
        argv += ["--dtype", args.dtype]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{mode} entropy={entropy}: child failed ({out.returncode})\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args: argparse.Namespace) -> int:
    import torch

    from medvl_engine.benchmarking import device_name, format_table, write_rows

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-learner-") as scratch:
        model_dir = save_random_llama(Path(scratch) / "model", args.vocab, args.hidden, args.layers)
        for entropy in ENTROPY[args.entropy]:
            times = run_child(args, model_dir, "time", entropy)
            base = None
            for path in PACKED_PATHS if args.packed else PATHS:
                row = run_child(args, model_dir, path, entropy)
                row.update(times[path], vocab=args.vocab, hidden=args.hidden, layers=args.layers)
                if path == "logits":
                    base = row
                else:
                    row["mem_vs_logits"] = row["extra_peak_mb"] / base["extra_peak_mb"]
                    row["speedup_vs_logits"] = base["ms"] / row["ms"]
                row["tokens_per_s"] = row["tokens"] / (row["ms"] / 1e3)
                rows.append(row)
                print(f"  {path:6s} entropy={entropy!s:5s} {row['ms']:9.1f} ms  {row['extra_peak_mb']:9.1f} MB",
                      file=sys.stderr)
    columns = ["op", "path", "entropy", "shape", "answer_rows", "ms", "ms_median", "tokens_per_s", "extra_peak_mb",
               "mem_vs_logits", "speedup_vs_logits"]
    print(f"device: {device_name()}   threads: {rows[0]['threads']}   dtype: {rows[0]['dtype']}")
    print(format_table(rows, columns))
    cuda = torch.cuda.is_available()
    tag = "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()
    folder = "benchmarks/results" if cuda else tempfile.gettempdir()
    out = write_rows(args.out or os.path.join(folder, f"learner-{tag}.jsonl"), rows)
    print(f"wrote {len(rows)} rows to {out}")
    return 0


# -- the child: one configuration, measured in a fresh process ----------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class Memory:
    """Extra peak bytes of one call: CUDA allocator statistics, or the resident set on a CPU."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so reusing them counts as growth
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        self.base = _status_kb("VmRSS") << 10

    def extra_peak(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return (_status_kb("VmHWM") << 10) - self.base


def child(args: argparse.Namespace) -> int:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import statistics
    import time

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from medvl_engine.trainers.config import DeepSpeedConfig, ModelConfig, OptimConfig
    from medvl_engine.trainers.learner import Learner, pad_sequences

    model_dir, mode, entropy = args.child[0], args.child[1], bool(int(args.child[2]))
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    batch = len(args.answers)
    # The timing child builds the fused learner and flips `fused_logprobs` between steps.
    learner = Learner.build(ModelConfig(path=model_dir, dtype=dtype, gradient_checkpointing=False),
                            OptimConfig(lr=1e-6), DeepSpeedConfig(zero_stage=args.zero_stage, micro_batch_size=batch),
                            train_batch_size=batch, total_steps=1, fused_logprobs=mode != "logits")
    vocab = learner.module.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(2, vocab, (args.prompt + n,), generator=gen).tolist() for n in args.answers]
    micro = pad_sequences(seqs, [args.prompt] * batch, pad_id=0).to(learner.device)
    mask = micro.mask

    def step():
        out = learner.response_logprobs(micro, temperature=0.9, return_entropy=entropy)
        logp, ent = out if entropy else (out, None)
        loss = -(logp * mask).sum() / mask.sum()
        if ent is not None:
            loss = loss - 1e-3 * (ent * mask).sum() / mask.sum()
        learner.backward(loss)
        if cuda:
            torch.cuda.synchronize()

    paths = PACKED_PATHS if args.packed else PATHS
    learner.packing = mode == "packed"
    if mode == "time":
        times = {path: [] for path in paths}
        for i in range(args.repeats + 1):
            for path in paths:
                learner.fused_logprobs = path != "logits"
                learner.packing = path == "packed"
                start = time.perf_counter()
                step()
                if i:  # the first round warms up
                    times[path].append(time.perf_counter() - start)
        print(json.dumps({path: {"ms": min(t) * 1e3, "ms_median": statistics.median(t) * 1e3}
                          for path, t in times.items()}))
        return 0
    step()  # warm-up: parameter gradients, DeepSpeed buffers, kernels
    memory = Memory(learner.device)
    memory.start()
    step()
    extra = memory.extra_peak()
    length = micro.input_ids.shape[1]
    print(json.dumps({
        "op": "learner fwd+bwd", "path": mode, "entropy": entropy, "dtype": dtype,
        "shape": f"B={batch} L={length} V={vocab} H={learner.module.config.hidden_size}",
        "batch": batch, "length": length, "answer_rows": int(mask.sum()), "positions": batch * (length - 1),
        "tokens": int(micro.attention_mask.sum()),
        "zero_stage": args.zero_stage, "threads": torch.get_num_threads(), "extra_peak_mb": extra / 2**20,
    }))
    return 0


if __name__ == "__main__":
    ARGS = parse_args()
    sys.exit(child(ARGS) if ARGS.child else main(ARGS))
