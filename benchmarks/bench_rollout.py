"""Rollout throughput: generated tokens/s of the RolloutPool over the hf backend vs a plain generate loop.

Both sides sample the same GRPO groups (n answers per prompt, bundled text-only questions cycled to
`--prompts`) with the same model. The plain loop calls `model.generate` once per prompt (its n answers
in one batch), as a hand-written rollout script would, and again with as many prompts per call as the
pool's batch holds (a static batch: the best a loop can do without scheduling); the pool runs
HFBackend with `--max-batch` sequences per generate call and scores every group as it finishes.
Tokens count each answer up to and including its end-of-sequence token. The pool's requests carry
per-position seeds as the rollout worker's do (`--unseeded`: none); the plain loops draw from torch's RNG.

    python benchmarks/bench_rollout.py                        # tiny random Llama (byte vocabulary)
    python benchmarks/bench_rollout.py --model PATH --device cuda --dtype bfloat16 --n 8 --max-new-tokens 512

Prints a table and writes one JSON row per measurement (GPU runs default to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from medvl_engine.benchmarking import device_name, environment, format_table, write_rows
from medvl_engine.data import load_bundled
from medvl_engine.rollout.hf_backend import HFBackend, load_model_and_processor
from medvl_engine.rollout.pool import RolloutPool
from medvl_engine.rollout.stream import PromptStream
from medvl_engine.rollout.types import SamplingParams

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Hugging Face folder (default: a tiny random Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=32, help="pool: sequences per generate call")
    parser.add_argument("--max-in-flight", type=int, default=8, help="pool: groups in flight")
    parser.add_argument("--unseeded", action="store_true", help="pool: requests without per-position seeds")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny model: layers")
    parser.add_argument("--out", default=None)
    return parser.parse_args(argv)


def tiny_model_and_tokenizer(hidden: int, layers: int):
    """A random Llama over a byte-level vocabulary (256 bytes + 3 ChatML specials), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    core = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(bytes_to_unicode().values())}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        padding_side="left", chat_template=CHATML)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=True, initializer_range=0.2,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def answer_tokens(tokens: torch.Tensor, eos_ids: set[int]) -> int:
    """Tokens of one generated row up to and including its first EOS (the rest is padding)."""
    for i, token in enumerate(tokens.tolist()):
        if token in eos_ids:
            return i + 1
    return len(tokens)


def plain_loop(model, requests, params: SamplingParams, device, eos_ids: set[int], pad_id: int,
               prompts_per_call: int = 1) -> int:
    """`model.generate` over `prompts_per_call` prompts x n answers at a time (left-padded); tokens generated."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=params.max_new_tokens, do_sample=True, temperature=params.temperature,
                              top_p=1.0, top_k=0, eos_token_id=sorted(eos_ids), pad_token_id=pad_id)
    total = 0
    for first in range(0, len(requests), prompts_per_call):
        rows = [r.input_ids for r in requests[first : first + prompts_per_call] for _ in range(params.n)]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        total += sum(answer_tokens(row, eos_ids) for row in out[:, width:].cpu())
    return total


async def pool_run(backend, requests, params: SamplingParams, max_in_flight: int):
    pool = RolloutPool([backend], requests, params, max_in_flight=max_in_flight)
    groups = [item async for item in pool.stream()]
    await backend.shutdown()
    return pool.stats, groups


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.model is None:
        model, processor = tiny_model_and_tokenizer(args.hidden, args.layers)
        model_name = f"tiny-llama-h{args.hidden}-l{args.layers}"
    else:
        model, processor = load_model_and_processor(args.model, dtype=args.dtype)
        model_name = os.path.basename(os.path.normpath(args.model))
    model = model.to(device).eval()
    samples = [s for s in load_bundled() if not s.images]
    stream = PromptStream(samples, processor, shuffle_seed=None, sample_seed=None if args.unseeded else 0,
                          stop=args.prompts)
    requests = list(stream.requests())
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    backend = HFBackend(model, processor, device=args.device, max_batch=args.max_batch)
    eos_ids, pad_id = set(backend.eos_token_ids), backend.pad_token_id

    # The loops run in a worker thread, like HFBackend's generate calls: on a loaded 2-core machine the
    # main thread's OpenMP team made one tiny generate call 25x slower (10.7 s vs 0.40 s), which would
    # credit the pool with a threading artefact.
    thread = ThreadPoolExecutor(max_workers=1)
    thread.submit(plain_loop, model, requests[:1], params, device, eos_ids, pad_id).result()  # warm-up
    start = time.perf_counter()
    plain_tokens = thread.submit(plain_loop, model, requests, params, device, eos_ids, pad_id).result()
    plain_s = time.perf_counter() - start
    per_call = max(1, args.max_batch // args.n)
    start = time.perf_counter()
    batched_tokens = thread.submit(plain_loop, model, requests, params, device, eos_ids, pad_id, per_call).result()
    batched_s = time.perf_counter() - start
    thread.shutdown()

    start = time.perf_counter()
    stats, groups = asyncio.run(pool_run(backend, requests, params, args.max_in_flight))
    pool_s = time.perf_counter() - start
    if len(groups) != len(requests):
        raise SystemExit(f"pool returned {len(groups)} items for {len(requests)} prompts")

    shape = {"model": model_name, "device": device_name(), "prompts": args.prompts, "n": args.n,
             "max_new_tokens": args.max_new_tokens, "dtype": str(next(model.parameters()).dtype)}
    plain_rate = plain_tokens / plain_s
    rows = [
        {**shape, "impl": "generate loop (1 prompt x n per call)", "tokens": plain_tokens, "seconds": plain_s,
         "tokens_per_s": plain_rate, "speedup": 1.0},
        {**shape, "impl": f"generate loop ({per_call} prompts x n per call)", "tokens": batched_tokens,
         "seconds": batched_s, "tokens_per_s": batched_tokens / batched_s,
         "speedup": (batched_tokens / batched_s) / plain_rate},
        {**shape, "impl": f"RolloutPool + HFBackend (max_batch {args.max_batch}, scored"
                          f"{', unseeded' if args.unseeded else ', seeded'})",
         "tokens": stats.tokens_generated, "seconds": pool_s, "tokens_per_s": stats.tokens_generated / pool_s,
         "speedup": (stats.tokens_generated / pool_s) / plain_rate},
    ]
    print(f"device: {device_name()}   model: {model_name}   {args.prompts} prompts x n={args.n}, "
          f"max_new_tokens={args.max_new_tokens}")
    print(format_table(rows, ["impl", "tokens", "seconds", "tokens_per_s", "speedup"]))
    tag = "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()
    folder = "benchmarks/results" if device.type == "cuda" else "benchmarks/out"
    out = write_rows(args.out or os.path.join(folder, f"rollout-{tag}.jsonl"), rows)
    print(f"wrote {len(rows)} rows to {out} ({environment()['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
