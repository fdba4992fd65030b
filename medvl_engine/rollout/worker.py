"""`medvl-engine rollout-worker`: one process that turns a dataset into a stream of scored GRPO groups.

    medvl-engine rollout-worker --backend hf --model ./policy --dataset bundled \\
        --connect tcp://learner:5555 --producer-id worker-0 --n 8 --temperature 1.0

It renders each sample's prompt with the model's chat template (`medvl_engine.prompts.render_prompt`),
runs a RolloutPool over one backend (data-parallel replicas are separate worker processes), and sends
every group to the learner with `medvl_engine.transport.channel.GroupSender`, waiting for credit when
the learner is behind. A `WeightVersion` announcement with a path loads those weights from disk; the
learner's version also drives the pool's staleness bound.

Positions: the prompt at stream position k is a fixed function of k (sample k mod N of epoch k // N,
in dataset order or shuffled per epoch with `--shuffle-seed`), and its group (or its RolloutError)
is sent with sequence number k, in order. A restarted worker asks the learner for its position
(`handshake`) and continues from there: nothing is lost or sent twice. Groups that finish out of
order wait in a reorder buffer until the ones before them are sent. For the same reason the worker
does not drop constant-reward groups itself: the learner sees the rewards and filters them.

Seeds: the request at position k samples with `derive_seed(--seed, k)`, so its group is a function of
k too: after a learner `--resume`, the regenerated positions carry the answers the uninterrupted run
had (the same tokens; log-probs equal up to the float rounding of a differently shaped batch).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator, Sequence

from medvl_engine.rollout.backend import BACKENDS, Backend, make_backend
from medvl_engine.rollout.pool import FailedPrompt, RolloutPool, to_message
from medvl_engine.rollout.types import PromptRequest, SamplingParams, derive_seed
from medvl_engine.transport.messages import RolloutError

logger = logging.getLogger(__name__)

# How often the worker looks for weight announcements while it waits for groups: a weight load
# takes seconds, so 50 ms of latency is invisible.
_WEIGHT_POLL_S = 0.05


def add_arguments(parser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="hf", help="generation engine (default: hf)")
    parser.add_argument("--model", required=True, help="Hugging Face folder of the policy")
    parser.add_argument("--dataset", required=True, help="jsonl/parquet/saved dataset/hub name, or 'bundled'")
    parser.add_argument("--split", default="train", help="split of a hub or DatasetDict source (default: train)")
    parser.add_argument("--skip-invalid", action="store_true", help="skip (and report) rows that do not fit")
    parser.add_argument("--text-only", action="store_true", help="keep only samples without images")
    parser.add_argument("--connect", required=True, help="the learner's endpoint, e.g. tcp://host:5555 or ipc://...")
    parser.add_argument("--producer-id", default="rollout-0",
                        help="this worker's stream name; keep it across restarts (default: rollout-0)")
    parser.add_argument("--n", type=int, default=8, help="answers per prompt (GRPO group size)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--max-new-tokens", type=int, default=1024)
    parser.add_argument("--max-prompts", type=int, default=None,
                        help="stop after this many stream positions (default: cycle over the data forever)")
    parser.add_argument("--shard-index", type=int, default=0,
                        help="this worker's share of the prompt stream, of --num-shards (default: 0)")
    parser.add_argument("--num-shards", type=int, default=1,
                        help="data-parallel workers splitting the prompt stream (default: 1)")
    parser.add_argument("--shuffle-seed", type=int, default=None, help="shuffle each epoch with this seed")
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed; position k samples with a seed derived from it and k (default: 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="hf backend: torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--max-in-flight", type=int, default=16, help="groups in flight on the backend")
    parser.add_argument("--max-staleness", type=int, default=None, help="off-policy bound k in versions")
    parser.add_argument("--retries", type=int, default=2)
    parser.add_argument("--timeout-s", type=float, default=None, help="per-attempt generation timeout")
    parser.add_argument("--handshake-timeout-s", type=float, default=600.0,
                        help="how long to wait for the learner to answer (default: 600)")
    parser.add_argument("--device", default="cpu", help="hf backend: torch device (default: cpu)")
    parser.add_argument("--dtype", default=None, help="hf backend: torch dtype, e.g. bfloat16")
    parser.add_argument("--max-batch", type=int, default=16, help="hf backend: sequences per generate call")
    parser.add_argument("--tp-size", type=int, default=1, help="sglang backend: tensor-parallel size")
    parser.add_argument("--mem-fraction-static", type=float, default=None, help="sglang backend: KV cache share")


def main(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from medvl_engine.transport.channel import GroupSender

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)

    samples = _load_samples(args)
    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens)
    backend = _build_backend(args)
    processor = backend.processor if hasattr(backend, "processor") else load_processor(args.model)
    sender = GroupSender(args.connect, args.producer_id)
    worker = RolloutWorker(
        backend, sender, samples, processor, params, max_in_flight=args.max_in_flight,
        max_staleness=args.max_staleness, retries=args.retries, timeout_s=args.timeout_s,
        max_prompts=args.max_prompts, shuffle_seed=args.shuffle_seed, seed=args.seed,
        shard=args.shard_index, num_shards=args.num_shards,
        handshake_timeout_s=args.handshake_timeout_s,
    )
    try:
        sent = asyncio.run(worker.run())
    finally:
        sender.close()
    logger.info("%s: sent %d messages; %s", args.producer_id, sent, worker.stats)
    return 0


class RolloutWorker:
    """Pool -> reorder buffer -> GroupSender, with weight announcements applied to the backend."""

    def __init__(self, backend: Backend, sender, samples: Sequence, tokenizer_or_processor, params: SamplingParams,
                 *, max_in_flight: int = 16, max_staleness: int | None = None, retries: int = 2,
                 timeout_s: float | None = None, max_prompts: int | None = None, shuffle_seed: int | None = None,
                 seed: int = 0, shard: int = 0, num_shards: int = 1, handshake_timeout_s: float | None = None):
        if not samples:
            raise ValueError("RolloutWorker: the dataset has no samples")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"RolloutWorker: seed must be an int >= 0, got {seed!r}")
        self.backend = backend
        self.sender = sender
        self.samples = samples
        self.processor = tokenizer_or_processor
        self.params = params
        self.pool_options = dict(max_in_flight=max_in_flight, max_staleness=max_staleness, retries=retries,
                                 timeout_s=timeout_s)
        self.max_prompts = max_prompts
        self.shuffle_seed = shuffle_seed
        self.seed = seed
        self.shard, self.num_shards = shard, num_shards
        self.handshake_timeout_s = handshake_timeout_s
        self.stats = None
        self._positions: dict[str, int] = {}

    async def run(self) -> int:
        """Generate and send until `max_prompts` positions are sent (forever without it); returns messages sent."""
        start = self.sender.handshake(self.handshake_timeout_s)
        logger.info("%s: starting at stream position %d", self.sender.producer_id, start)
        pool = RolloutPool([self.backend], self._requests(start), self.params, **self.pool_options)
        self.stats = pool.stats
        watcher = asyncio.create_task(self._watch_weights(pool))
        ready: dict[int, object] = {}
        next_position, sent = start, 0
        try:
            async for item in pool.stream():
                position = self._positions.pop(item.request.prompt_id)
                ready[position] = self._message(item, position)
                while next_position in ready:
                    await self._send(ready.pop(next_position), pool)
                    next_position += 1
                    sent += 1
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await self.backend.shutdown()
        if ready:
            raise RuntimeError(f"RolloutWorker: positions {sorted(ready)} finished but {next_position} never did")
        return sent

    def _requests(self, start: int) -> Iterator[PromptRequest]:
        stream = stream_samples(self.samples, start, self.max_prompts, self.shuffle_seed, shard=self.shard,
                                num_shards=self.num_shards)
        for position, global_position, sample in stream:
            request = build_request(self.processor, sample, f"{sample.dataset_name}/{sample.dataset_index}@{position}",
                                    seed=derive_seed(self.seed, global_position))
            self._positions[request.prompt_id] = position
            yield request

    def _message(self, item, position: int):
        if isinstance(item, FailedPrompt):
            logger.warning("prompt %s failed after %d attempts: %s", item.request.prompt_id, item.attempts, item.reason)
            return RolloutError(producer=self.sender.producer_id, seq=position, prompt_id=item.request.prompt_id,
                                reason=item.reason, attempts=item.attempts)
        return to_message(item, producer=self.sender.producer_id, seq=position)

    async def _send(self, message, pool: RolloutPool) -> None:
        # send() blocks while the learner has given no credit; short waits keep the loop (and the
        # weight watcher) running, and a timed-out send has sent nothing, so it is simply repeated.
        while True:
            try:
                self.sender.send(message, timeout=_WEIGHT_POLL_S)
                return
            except TimeoutError:
                await self._apply_weights(pool)
                await asyncio.sleep(0)

    async def _watch_weights(self, pool: RolloutPool) -> None:
        while True:
            await self._apply_weights(pool)
            await asyncio.sleep(_WEIGHT_POLL_S)

    async def _apply_weights(self, pool: RolloutPool) -> None:
        update = self.sender.poll_weight_version()
        pool.set_consumer_version(self.sender.consumer_version)
        if update is None or update.version <= self.backend.weight_version:
            return
        if not update.path:
            logger.info("weights v%d announced without a path (a torch.distributed update drives them)",
                        update.version)
            return
        logger.info("loading weights v%d from %s", update.version, update.path)
        await self.backend.update_weights_from_disk(update.path, update.version)


def stream_samples(samples: Sequence, start: int, stop: int | None, shuffle_seed: int | None, *,
                   shard: int = 0, num_shards: int = 1):
    """(position, global position, sample) from `start` up to `stop` (None: forever).

    Data-parallel workers split one global stream: position k of shard i is global position
    g = k * num_shards + i, which is sample g mod N of epoch g // N (in dataset order, or shuffled per
    epoch with `shuffle_seed`), so W workers never answer the same prompt of an epoch twice."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    position, order, order_epoch = start, None, -1
    while stop is None or position < stop:
        global_position = position * num_shards + shard
        epoch, index = divmod(global_position, len(samples))
        if epoch != order_epoch:
            order = list(range(len(samples)))
            if shuffle_seed is not None:
                random.Random(shuffle_seed * 1_000_003 + epoch).shuffle(order)
            order_epoch = epoch
        yield position, global_position, samples[order[index]]
        position += 1


def build_request(tokenizer_or_processor, sample, prompt_id: str, *, seed: int | None = None) -> PromptRequest:
    """The prompt of `sample` as text and token ids (images as one placeholder each), with its images and seed."""
    from medvl_engine.prompts import render_prompt

    text = render_prompt(tokenizer_or_processor, sample)
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return PromptRequest(prompt_id, input_ids=input_ids, text=text, images=list(sample.images), sample=sample,
                         seed=seed)


def load_processor(path: str):
    """The tokenizer (text model) or processor (vision-language model) of a Hugging Face folder."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    if getattr(AutoConfig.from_pretrained(path), "vision_config", None) is None:
        return AutoTokenizer.from_pretrained(path)
    return AutoProcessor.from_pretrained(path)


def _load_samples(args):
    from medvl_engine.data import load_bundled, load_samples

    if args.dataset == "bundled":
        samples = load_bundled(skip_invalid=args.skip_invalid)
    else:
        samples = load_samples(args.dataset, split=args.split, skip_invalid=args.skip_invalid)
    kept = [s for s in samples if not (args.text_only and s.images)]
    if not kept:
        raise SystemExit(f"rollout-worker: no samples left in {args.dataset!r}"
                         + (" after --text-only" if args.text_only else ""))
    if args.text_only:
        logger.info("--text-only: kept %d of %d samples", len(kept), len(samples))
    return kept


def _build_backend(args) -> Backend:
    if args.backend == "hf":
        return make_backend("hf", args.model, device=args.device, dtype=args.dtype, max_batch=args.max_batch)
    kwargs = {"tp_size": args.tp_size}
    if args.mem_fraction_static is not None:
        kwargs["mem_fraction_static"] = args.mem_fraction_static
    return make_backend("sglang", args.model, **kwargs)
