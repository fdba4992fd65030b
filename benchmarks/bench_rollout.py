"""Rollout throughput: generated tokens/s and groups/s of the RolloutPool against the engine's own batch generation.

`--backend hf`: the pool over HFBackend (scoring every group as it finishes) against `model.generate` on
static batches of as many prompts x n as the pool's batch holds (the best a loop can do without
scheduling); `--backend vllm`: the pool over VLLMBackend (AsyncLLM) against vLLM's offline
`LLM.generate` on all prompts at once, both engines built from the same engine arguments and given
the same requests (prompt token ids, n, temperature, seeds, log-probs), warmed up alike. Both sides
answer the same bundled text-only questions (cycled to `--prompts`), n samples each; the printed
`comparison:` line says what each side does. The methods alternate round by round and the table
reports medians of the per-round ratios: on a shared 2-core machine a method timed once, after the
other, measures the machine more than the code. Tokens count each answer up to and including its
end-of-sequence token.

    python benchmarks/bench_rollout.py --model smollm2 --dtype bfloat16 --prompts 16 --n 8 --max-new-tokens 128
    .venv-vllm/bin/python benchmarks/bench_rollout.py --backend vllm --model smollm2 --dtype bfloat16 ...

Prints a table and writes one JSON row per method (GPU runs default to benchmarks/results/).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# Like every command of the project: OpenMP threads that sleep instead of spinning when they wait (on a
# shared CPU a spinning team slows generation several times over); set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
    parser.add_argument("--model", default=None,
                        help="Hugging Face folder or `smollm2` (the embedded default; default: a tiny random Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-batch", type=int, default=32, help="pool: sequences per generate call")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="pool: groups in flight (default: hf 8, vllm every prompt, as offline generate)")
    parser.add_argument("--unseeded", action="store_true", help="pool: requests without per-position seeds")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model: hidden size")
    parser.add_argument("--layers", type=int, default=4, help="tiny model: layers")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf",
                        help="hf: the pool on HFBackend against a static-batch generate loop; vllm: the pool on "
                             "VLLMBackend against vLLM's offline LLM.generate (run it in the vLLM environment)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="vllm: each of the two engines' memory share (on the CPU: of host memory; default 0.4 "
                             "on a GPU, 0.15 on the CPU)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (the table shows medians)")
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


def rounds_table(names: list[str], times: dict[str, list[float]], tokens: dict[str, list[int]],
                 groups: int) -> list[dict]:
    """Per method: median tokens/s and groups/s (`groups` prompts x n per round) over the rounds, and the
    medians of its per-round tokens/s and groups/s ratios to the first method (the engine's own generate);
    interleaved rounds cancel the machine's drift. The groups/s ratio compares the same work: a round
    lasts as long as its longest answers, so sides that sample different answers (different RNGs, or
    batches that round differently) generate different token counts in about the same time."""
    import statistics

    base = names[0]
    rows = []
    for name in names:
        rates = [t / s for t, s in zip(tokens[name], times[name])]
        ratios = [(t / s) / (bt / bs) for t, s, bt, bs in zip(tokens[name], times[name], tokens[base], times[base])]
        group_ratios = [bs / s for s, bs in zip(times[name], times[base])]
        rows.append({"impl": name, "rounds": len(rates), "tokens": tokens[name][-1],
                     "tokens_per_s": statistics.median(rates),
                     "groups_per_s": statistics.median(groups / s for s in times[name]),
                     "ratio_median": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "groups_ratio_median": statistics.median(group_ratios)})
    return rows


def run_hf(args, requests, params, model, processor, device) -> list[dict]:
    """hf: one static-batch `model.generate` loop against the pool over HFBackend, interleaved by round."""
    backend = HFBackend(model, processor, device=args.device, max_batch=args.max_batch)
    eos_ids, pad_id = set(backend.eos_token_ids), backend.pad_token_id
    per_call = max(1, args.max_batch // args.n)
    # The loops run in a worker thread, like HFBackend's generate calls: on a loaded 2-core machine the
    # main thread's OpenMP team made one tiny generate call 25x slower (10.7 s vs 0.40 s), which would
    # credit the pool with a threading artefact. One thread for the whole run: a fresh thread per
    # timed run was measured ~20% slower.
    thread = ThreadPoolExecutor(max_workers=1)
    thread.submit(plain_loop, model, requests[:1], params, device, eos_ids, pad_id).result()  # warm-up
    loop = asyncio.new_event_loop()
    names = [f"generate ({per_call} prompts x n per call)", f"RolloutPool + HFBackend (max_batch {args.max_batch})"]
    times = {n: [] for n in names}
    tokens = {n: [] for n in names}
    for _ in range(args.rounds):
        start = time.perf_counter()
        tokens[names[0]].append(thread.submit(plain_loop, model, requests, params, device, eos_ids, pad_id,
                                              per_call).result())
        times[names[0]].append(time.perf_counter() - start)
        start = time.perf_counter()
        pool = RolloutPool([backend], iter(requests), params, max_in_flight=args.max_in_flight or 8)
        loop.run_until_complete(_drain(pool))
        times[names[1]].append(time.perf_counter() - start)
        tokens[names[1]].append(pool.stats.tokens_generated)
        _progress(names, times, tokens)
    thread.shutdown()
    loop.run_until_complete(backend.shutdown())
    return rounds_table(names, times, tokens, len(requests))


def _progress(names: list[str], times: dict[str, list[float]], tokens: dict[str, list[int]]) -> None:
    """One line per finished round (a long run shows where it is)."""
    rates = [tokens[n][-1] / times[n][-1] for n in names]
    print(f"round {len(times[names[0]])}: " + ", ".join(f"{n}: {r:.1f} tok/s" for n, r in zip(names, rates))
          + f" (ratio {rates[1] / rates[0]:.3f})", file=sys.stderr, flush=True)


async def _drain(pool) -> None:
    from medvl_engine.rollout.groups import FailedPrompt

    async for item in pool.stream():
        if isinstance(item, FailedPrompt):
            raise SystemExit(f"prompt {item.request.prompt_id} failed: {item.reason}")


def run_vllm(args, requests, params, model_path: str) -> list[dict]:
    """vllm: vLLM's own offline `LLM.generate` on all prompts against the pool over VLLMBackend (AsyncLLM).

    Both engines start from the same engine arguments (`vllm_backend.engine_args`) and get the same
    requests: each prompt's token ids with the backend's own sampling parameters (n, temperature,
    top-p/top-k, max tokens, the prompt's seed, the sampled tokens' log-probs). Both are warmed up on
    the first prompt before the timed rounds."""
    from vllm import LLM

    from medvl_engine.rollout.vllm_backend import VLLMBackend, engine_args, vllm_prompt, vllm_sampling_params

    # The KV cache holds every sequence of a round (prompts + answers) without preemption.
    shared = dict(dtype=args.dtype or "auto", seed=0, gpu_memory_utilization=args.gpu_memory_utilization,
                  max_model_len=max(len(r.input_ids) for r in requests) + params.max_new_tokens)
    offline = LLM(**engine_args(model_path, **shared))
    prompts = [vllm_prompt(r) for r in requests]
    sampling = [vllm_sampling_params(params, r.seed_for(params)) for r in requests]
    backend = VLLMBackend.from_pretrained(model_path, **shared)
    loop = asyncio.new_event_loop()
    names = ["vLLM LLM.generate (offline)", "RolloutPool + VLLMBackend (AsyncLLM)"]
    times = {n: [] for n in names}
    tokens = {n: [] for n in names}
    offline.generate(prompts[:1], sampling[:1], use_tqdm=False)  # warm-up
    loop.run_until_complete(backend.generate(requests[0], params))
    for _ in range(args.rounds):
        start = time.perf_counter()
        outs = offline.generate(prompts, sampling, use_tqdm=False)
        times[names[0]].append(time.perf_counter() - start)
        tokens[names[0]].append(sum(len(c.token_ids) for o in outs for c in o.outputs))
        start = time.perf_counter()
        pool = RolloutPool([backend], iter(requests), params, max_in_flight=args.max_in_flight or len(requests))
        loop.run_until_complete(_drain(pool))
        times[names[1]].append(time.perf_counter() - start)
        tokens[names[1]].append(pool.stats.tokens_generated)
        _progress(names, times, tokens)
    loop.run_until_complete(backend.shutdown())
    loop.close()
    return rounds_table(names, times, tokens, len(requests))


def comparison(args, params: SamplingParams) -> str:
    """What both sides of the table do, and where they differ."""
    common = (f"same {args.prompts} prompts (token ids), n={params.n}, temperature={params.temperature}, top-p "
              f"{params.top_p}, top-k off, max_new_tokens={params.max_new_tokens}")
    seeds = "no per-prompt seeds" if args.unseeded else "a seed per prompt"
    if args.backend == "vllm":
        return (f"{common}; both: same engine arguments, {seeds}, the sampled tokens' log-probs (answers can still "
                "differ: logits round differently in differently composed batches); the pool also scores every group")
    return (f"{common}; generate: torch's global RNG, no log-probs; the pool: {seeds} (one RNG per prompt), "
            "the sampled tokens' log-probs, every group scored")


def main(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    if args.model is None:
        model, processor = tiny_model_and_tokenizer(args.hidden, args.layers)
        model_name = f"tiny-llama-h{args.hidden}-l{args.layers}"
    else:
        from medvl_engine.models import resolve_model_path

        args.model = resolve_model_path(args.model)
        model, processor = load_model_and_processor(args.model, dtype=args.dtype)
        model_name = os.path.basename(os.path.normpath(args.model))
    samples = [s for s in load_bundled() if not s.images]
    stream = PromptStream(samples, processor, shuffle_seed=None, sample_seed=None if args.unseeded else 0,
                          stop=args.prompts)
    requests = list(stream.requests())
    params = SamplingParams(n=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    if args.backend == "vllm":
        import tempfile

        folder = args.model
        if folder is None:  # the tiny model as a folder vLLM can load
            folder = tempfile.mkdtemp(prefix="medvl-bench-")
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
        if args.gpu_memory_utilization is None:
            args.gpu_memory_utilization = 0.4 if torch.cuda.is_available() else 0.15
        rows = run_vllm(args, requests, params, folder)
    else:
        rows = run_hf(args, requests, params, model.to(device).eval(), processor, device)
    shape = {"bench": "rollout", "backend": args.backend, "model": model_name, "device": device_name(),
             "prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens, **environment()}
    rows = [{**shape, **row} for row in rows]
    print(f"device: {device_name()}   model: {model_name}   {args.prompts} prompts x n={args.n}, "
          f"max_new_tokens={args.max_new_tokens}, {args.rounds} interleaved rounds (medians)")
    print(f"comparison: {comparison(args, params)}")
    print(format_table(rows, ["impl", "rounds", "tokens", "tokens_per_s", "groups_per_s", "ratio_median", "ratio_min",
                              "ratio_max", "groups_ratio_median"]))
    tag = "".join(c if c.isalnum() else "-" for c in device_name()).strip("-").lower()
    folder = "benchmarks/results" if device.type == "cuda" else "benchmarks/out"
    out = write_rows(args.out or os.path.join(folder, f"rollout-{args.backend}-{tag}.jsonl"), rows)
    print(f"wrote {len(rows)} rows to {out} ({environment()['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
