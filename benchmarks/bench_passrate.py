"""Benchmark of pass-rate estimation: the rollout pool against a plain loop over `model.generate`.

Both answer the same questions n times each with the same model, the same sampling settings
(temperature 1.0, top_p 1.0, max new tokens, EOS) and the same strict reward-mode grading; the
baseline is what most evaluation harnesses do: fixed batches of questions, `generate` with
`num_return_sequences=n`, decode, score, next batch. The pool is `medvl-engine passrate`'s path
(`evals.runner.generate_into` with the hf backend): questions in flight, each written as it finishes.
Reports questions/s and generated tokens/s (tokens up to and including EOS; medians of interleaved
runs), and the pool's ratio.

    python benchmarks/bench_passrate.py                                  # SmolLM2-135M, CPU, small
    python benchmarks/bench_passrate.py --model PATH --device cuda --questions 64 --max-new-tokens 512
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="model folder or `smollm2` (the embedded default)")
    parser.add_argument("--source", default="bundled", help="questions (any source load_samples reads)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--questions", type=int, default=6, help="questions answered per method")
    parser.add_argument("--n", type=int, default=16, help="samples per question (MedVLThinker: 16)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="sequences per generate call, both methods")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs per method, interleaved; the table shows the median")
    parser.add_argument("--out", default=None,
                        help="JSON-lines output (default: benchmarks/results/passrate-<device>.jsonl on a GPU, "
                             "the temp folder on a CPU: results/ holds GPU measurements only)")
    return parser.parse_args(argv)


def load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medvl_engine.models import resolve_model_path

    path = resolve_model_path(args.model)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def run_pool(model, tokenizer, questions, args) -> tuple[float, int]:
    """`medvl-engine passrate`'s path: the pool over an HFBackend, records appended to a results file."""
    from medvl_engine.evals.results import ResultsFile
    from medvl_engine.evals.runner import generate_into
    from medvl_engine.rollout.config import RolloutConfig
    from medvl_engine.rollout.hf_backend import HFBackend

    # The sampling and the pool's bounds as `medvl-engine passrate --rollout.*` would set them; each question
    # samples with a seed derived from (seed, its position), as in a pass-rate run.
    rollout = RolloutConfig(n=args.n, temperature=1.0, top_p=1.0, max_response_tokens=args.max_new_tokens,
                            seed=args.seed, device=args.device, max_batch=args.max_batch)
    with tempfile.TemporaryDirectory() as tmp:
        async def run():
            backend = HFBackend(model, tokenizer, device=args.device, max_batch=args.max_batch)
            try:
                return await generate_into(ResultsFile(Path(tmp) / "results.jsonl"), questions, [backend], tokenizer,
                                           rollout, mode="reward", progress_every_s=0)
            finally:
                await backend.shutdown()

        stats = asyncio.run(run())
    if stats.failed or stats.written != len(questions):
        raise RuntimeError(f"pool run incomplete: {stats.written} written, failures {stats.failed[:3]}")
    return stats.seconds, stats.tokens


def run_loop(model, tokenizer, questions, args) -> tuple[float, int]:
    """The baseline: fixed batches of questions through `model.generate`, then decode and score."""
    import torch
    from transformers import GenerationConfig

    from medvl_engine.prompts import render_prompt
    from medvl_engine.rewards import score_samples

    eos = {tokenizer.eos_token_id}
    if model.generation_config.eos_token_id is not None:
        ids = model.generation_config.eos_token_id
        eos |= {ids} if isinstance(ids, int) else set(ids)
    config = GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                              num_return_sequences=args.n, eos_token_id=sorted(eos),
                              pad_token_id=tokenizer.pad_token_id)
    per_batch = max(1, args.max_batch // args.n)
    tokens = 0
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    for i in range(0, len(questions), per_batch):
        chunk = questions[i : i + per_batch]
        texts = [render_prompt(tokenizer, s) for s in chunk]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(args.device)
        with torch.inference_mode():
            out = model.generate(**enc, generation_config=config)
        new = out[:, enc["input_ids"].shape[1]:].cpu()
        answers = []
        for row in new.tolist():
            end = next((k + 1 for k, t in enumerate(row) if t in eos), len(row))
            tokens += end
            answers.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        score_samples(answers, [s for s in chunk for _ in range(args.n)], mode="reward")
    return time.perf_counter() - start, tokens


def main(argv=None) -> int:
    args = parse_args(argv)
    import statistics

    import torch

    from medvl_engine.benchmarking import device_name, format_table, write_rows
    from medvl_engine.rollout.config import DataConfig
    from medvl_engine.rollout.stream import load_data

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    # Dataset order, images dropped (a text model answers the question text), one extra for the warm-up.
    questions = load_data(DataConfig(source=args.source, split=args.split, ignore_images=True, shuffle=False,
                                     max_samples=args.questions + 1))
    warm, questions = questions[:1], questions[1:]
    # One untimed question each: the first generate call pays one-off kernel set-up.
    run_loop(model, tokenizer, warm, args)
    run_pool(model, tokenizer, warm, args)
    methods = (("generate loop", run_loop), ("rollout pool", run_pool))
    # Interleaved (loop, pool, loop, pool, ...) so a change in machine load hits both methods alike.
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name, _ in methods}
    for _ in range(args.repeats):
        for name, fn in methods:
            runs[name].append(fn(model, tokenizer, questions, args))
    rows = []
    for name, _ in methods:
        seconds = statistics.median(s for s, _ in runs[name])
        tokens = statistics.median(t for _, t in runs[name])
        rows.append({"bench": "passrate", "method": name, "model": args.model, "dtype": args.dtype,
                     "threads": torch.get_num_threads(), "questions": len(questions), "n": args.n,
                     "max_new_tokens": args.max_new_tokens, "batch_sequences": args.max_batch,
                     "repeats": args.repeats, "seconds": seconds, "seconds_runs": [s for s, _ in runs[name]],
                     "tokens": tokens, "questions_per_s": len(questions) / seconds, "tokens_per_s": tokens / seconds})
    base = rows[0]
    for row in rows:
        row["vs_loop_tokens_per_s"] = row["tokens_per_s"] / base["tokens_per_s"]
        row["vs_loop_questions_per_s"] = row["questions_per_s"] / base["questions_per_s"]
    print(f"device: {device_name()}")
    print(format_table(rows, ["method", "questions", "n", "max_new_tokens", "batch_sequences", "seconds", "tokens",
                              "questions_per_s", "tokens_per_s", "vs_loop_tokens_per_s"]))
    out = args.out
    if out is None:
        on_gpu = args.device.startswith("cuda")
        out = (Path(__file__).parent / "results" / "passrate-gpu.jsonl" if on_gpu
               else Path(tempfile.gettempdir()) / "bench_passrate.jsonl")
    print(f"rows written to {write_rows(out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
