"""Weight sync time per GB: learner (DeepSpeed) -> rollout backend, by way of memory and of disk.

    python benchmarks/bench_weight_sync.py                          # a random 8-layer Llama (~60 MB fp32)
    python benchmarks/bench_weight_sync.py --model smollm2 --dtype bf16 --zero-stage 3

Per path it times `push(learner, version)` end to end (gathering the parameters bucket by bucket,
plus for `memory` the copy into an hf backend in this process, for `disk` the safetensors export and
the backend's `update_weights_from_disk`), and reports seconds and seconds per GB of weights. The
distributed (NCCL) path needs GPUs on both sides and is not measured here. Prints a table and writes
one JSON row per measurement (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path


def random_llama(folder: Path, hidden: int, layers: int, vocab: int) -> str:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    vocab_map = {"<pad>": 0, "</s>": 1, **{f"t{i}": i + 2 for i in range(vocab - 2)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab_map, unk_token="<pad>")),
                                        eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(folder)
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="model folder or `smollm2` (default: a random Llama)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/weight_sync.jsonl")
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

    from medvl_engine.benchmarking import device_name, format_table, median_time, write_rows
    from medvl_engine.models import resolve_model_path
    from medvl_engine.rollout.hf_backend import HFBackend
    from medvl_engine.trainers.config import DeepSpeedConfig, ModelConfig, OptimConfig
    from medvl_engine.trainers.learner import Learner
    from medvl_engine.trainers.weight_sync import DiskSync, MemorySync

    scratch = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    path = resolve_model_path(args.model) if args.model else random_llama(scratch / "model", args.hidden,
                                                                            args.layers, args.vocab)
    learner = Learner.build(ModelConfig(path=path, dtype=args.dtype, gradient_checkpointing=False),
                            OptimConfig(), DeepSpeedConfig(zero_stage=args.zero_stage), train_batch_size=1,
                            total_steps=1)
    nbytes = sum(t.numel() * t.element_size() for b in learner.full_parameters() for _, t in b)
    backend_dtype = "bfloat16" if args.dtype == "bf16" else "float32"
    loop = asyncio.new_event_loop()
    backend = HFBackend.from_pretrained(path, dtype=backend_dtype)
    versions = iter(range(1, 10**6))

    memory = MemorySync([backend], bucket_bytes=args.bucket_mb << 20, run=loop.run_until_complete)
    announced = []
    disk = DiskSync(scratch / "weights", announced.append)

    def disk_push():
        disk.push(learner, next(versions))
        loop.run_until_complete(backend.update_weights_from_disk(announced[-1].path, announced[-1].version))

    rows = []
    for name, fn in (("gather", lambda: [None for _ in learner.full_parameters(args.bucket_mb << 20)]),
                     ("memory", lambda: memory.push(learner, next(versions))),
                     ("disk", disk_push)):
        start = time.perf_counter()
        seconds = median_time(fn, repeats=args.repeats, warmup=1)
        rows.append({"path": name, "model": args.model or f"llama-h{args.hidden}-l{args.layers}",
                     "dtype": args.dtype, "zero_stage": args.zero_stage, "bucket_mb": args.bucket_mb,
                     "weights_mb": nbytes / 2**20, "seconds": seconds, "s_per_gb": seconds / (nbytes / 2**30),
                     "gb_per_s": nbytes / 2**30 / seconds, "wall_s": time.perf_counter() - start})
    loop.run_until_complete(backend.shutdown())
    print(f"weight sync on {device_name()}")
    print(format_table(rows, ("path", "model", "dtype", "zero_stage", "weights_mb", "seconds", "s_per_gb", "gb_per_s")))
    print(f"wrote {write_rows(args.out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
