"""Throughput of the group channel against the two ways one could do without it.

Realistic GRPO groups (8 answers of 512-4096 tokens, int32 token ids and float32 log-probs; a prompt of
256-1024 tokens) go from a producer process to a consumer that decodes each one, through:
- `channel`: GroupSender -> GroupReceiver (credits, sequence numbers, ROUTER/DEALER), ipc and tcp;
- `zmq-push`: bare ZeroMQ PUSH/PULL of the same msgspec messages, the baseline the protocol must track;
- `mp-queue`: a multiprocessing queue pickling the same groups as dicts of numpy arrays.
Groups/s and MB/s (bytes of the encoded message, the same per group for every method) are the median of
`--repeats` rounds (each round runs every method once), timed at the consumer from the `--warmup`-th group
to the last. `consumer_cpu_us` is the consumer process's CPU time per group (its ZeroMQ I/O thread included):
on a shared machine it moves far less with other processes' load than the wall-clock rates do, and the
1-minute load average is recorded with every row.

Run: python benchmarks/bench_transport.py [--groups 3000] [--credits 32] [--out bench_transport.jsonl]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
import time

import numpy as np
import zmq

from medvl_engine.benchmarking import format_table, write_rows
from medvl_engine.transport.messages import RolloutGroup, decode, encode
from medvl_engine.transport.protocol import AUTO_SEQ
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender

DISTINCT = 32  # distinct groups cycled by the producer: ~5 MB, so no one group stays hot in cache


def make_groups(seed: int, count: int, answers: int, chars_per_token: int) -> list[RolloutGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(count):
        lengths = rng.integers(512, 4097, size=answers)
        rewards = rng.integers(0, 2, size=answers).astype(np.float32)
        groups.append(RolloutGroup.build(
            producer="bench", seq=AUTO_SEQ, prompt_id=f"q{i}", dataset_name="pmc_vqa", dataset_index=i,
            weight_version=0, answer_label="C",
            prompt_ids=rng.integers(0, 151_643, size=int(rng.integers(256, 1025))),
            response_ids=[rng.integers(0, 151_643, size=int(t)) for t in lengths],
            logprobs=[-rng.random(int(t), dtype=np.float32) for t in lengths],
            texts=["x" * (chars_per_token * int(t)) for t in lengths],
            finish_reasons=["stop"] * answers, rewards=rewards, correct=rewards > 0,
            format_ok=np.ones(answers, dtype=bool), letters=["C"] * answers))
    return groups


def as_numpy_dict(group: RolloutGroup) -> dict:
    """The same group the way a pickling pipeline would carry it."""
    return {
        "producer": group.producer, "seq": group.seq, "prompt_id": group.prompt_id,
        "dataset_name": group.dataset_name, "dataset_index": group.dataset_index,
        "weight_version": group.weight_version, "answer_label": group.answer_label,
        "prompt_ids": group.prompt_array(),
        "response_ids": [group.response_array(i) for i in range(group.n)],
        "logprobs": [group.logprob_array(i) for i in range(group.n)],
        "texts": group.texts, "finish_reasons": group.finish_reasons, "rewards": group.reward_array(),
        "correct": group.correct_array(), "format_ok": group.format_array(), "letters": group.letters,
    }


# ------------------------------------------------------------------------------ producers (child processes)


def produce_channel(endpoint: str, total: int, shape: tuple) -> None:
    groups = make_groups(*shape)
    sender = GroupSender(endpoint, "bench", insecure=True)
    sender.handshake(timeout=60)
    for i in range(total):
        group = groups[i % len(groups)]
        group.seq = AUTO_SEQ
        sender.send(group, timeout=60)
    sender.close()


def produce_push(endpoint: str, total: int, shape: tuple) -> None:
    groups = make_groups(*shape)
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.connect(endpoint)
    for i in range(total):
        group = groups[i % len(groups)]
        group.seq = i
        sock.send(encode(group), copy=False)
    sock.close(linger=60_000)
    context.term()


def produce_queue(queue, total: int, shape: tuple) -> None:
    groups = [as_numpy_dict(g) for g in make_groups(*shape)]
    for i in range(total):
        groups[i % len(groups)]["seq"] = i
        queue.put(groups[i % len(groups)])


# ------------------------------------------------------------------------------------ consumers (timed)


def timed(next_group, total: int, warmup: int) -> tuple[float, float]:
    """Wall seconds and consumer CPU seconds (every thread of this process, ZeroMQ's I/O thread included) to
    take groups warmup..total-1, after the first `warmup` (start-up, connection) arrived."""
    for _ in range(warmup):
        next_group()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(total - warmup):
        next_group()
    return time.perf_counter() - start, time.process_time() - cpu


def run_channel(endpoint: str, total: int, warmup: int, shape: tuple, credits: int, spawn) -> tuple[float, float]:
    with GroupReceiver(endpoint, credits=credits, insecure=True) as receiver:
        proc = spawn.Process(target=produce_channel, args=(receiver.endpoint, total, shape))
        proc.start()
        seconds = timed(lambda: receiver.recv(timeout=60), total, warmup)
        proc.join()
    return seconds


def run_push(endpoint: str, total: int, warmup: int, shape: tuple, spawn) -> tuple[float, float]:
    context = zmq.Context()
    sock = context.socket(zmq.PULL)
    sock.bind(endpoint)
    proc = spawn.Process(target=produce_push, args=(sock.getsockopt_string(zmq.LAST_ENDPOINT), total, shape))
    proc.start()
    seconds = timed(lambda: decode(sock.recv(copy=False).buffer), total, warmup)
    proc.join()
    sock.close(linger=0)
    context.term()
    return seconds


def run_queue(total: int, warmup: int, shape: tuple, spawn) -> tuple[float, float]:
    queue = spawn.Queue(maxsize=64)
    proc = spawn.Process(target=produce_queue, args=(queue, total, shape))
    proc.start()
    seconds = timed(queue.get, total, warmup)
    proc.join()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--groups", type=int, default=3000, help="groups per run")
    parser.add_argument("--warmup", type=int, default=100, help="groups taken before the clock starts")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--answers", type=int, default=8)
    parser.add_argument("--chars-per-token", type=int, default=0,
                        help="answer text carried along (0: token ids and log-probs only)")
    parser.add_argument("--credits", type=int, default=32)
    parser.add_argument("--out", default="bench_transport.jsonl")
    args = parser.parse_args()
    if args.groups <= args.warmup:
        parser.error(f"--groups ({args.groups}) must exceed --warmup ({args.warmup})")

    shape = (0, DISTINCT, args.answers, args.chars_per_token)
    groups = make_groups(*shape)
    message_bytes = statistics.mean(len(encode(g)) for g in groups)
    tokens = statistics.mean(sum(len(r) // 4 for r in g.response_ids) for g in groups)
    spawn = mp.get_context("spawn")
    rows = []
    with tempfile.TemporaryDirectory(prefix="medvl-bench-") as folder:
        cases = {
            ("channel", "ipc"): lambda: run_channel(f"ipc://{folder}/c.sock", args.groups, args.warmup, shape,
                                                    args.credits, spawn),
            ("channel", "tcp"): lambda: run_channel("tcp://127.0.0.1:*", args.groups, args.warmup, shape,
                                                    args.credits, spawn),
            ("zmq-push", "ipc"): lambda: run_push(f"ipc://{folder}/p.sock", args.groups, args.warmup, shape, spawn),
            ("zmq-push", "tcp"): lambda: run_push("tcp://127.0.0.1:*", args.groups, args.warmup, shape, spawn),
            ("mp-queue", "pipe"): lambda: run_queue(args.groups, args.warmup, shape, spawn),
        }
        # Rounds interleave the methods, so load from other processes on a shared machine falls on all alike.
        times = {case: [] for case in cases}
        for _ in range(args.repeats):
            for case, run in cases.items():
                times[case].append(run())
        load = os.getloadavg()[0]  # other processes' share of the cores, which the timings cannot see
        for (method, link), runs in times.items():
            seconds = statistics.median(wall for wall, _ in runs)
            consumer_cpu = statistics.median(cpu for _, cpu in runs)
            rate = (args.groups - args.warmup) / seconds
            rows.append({"bench": "transport", "method": method, "link": link, "groups": args.groups,
                         "answers": args.answers, "mean_answer_tokens": tokens / args.answers,
                         "message_kb": message_bytes / 1e3, "credits": args.credits if method == "channel" else "",
                         "groups_per_s": rate, "mb_per_s": rate * message_bytes / 1e6,
                         "consumer_cpu_us": consumer_cpu / (args.groups - args.warmup) * 1e6, "load_avg_1m": load})
    by_key = {(r["method"], r["link"]): r for r in rows}
    for row in rows:
        same_link = "ipc" if row["link"] == "pipe" else row["link"]  # the queue is compared with local ipc
        row["vs_zmq_push"] = row["groups_per_s"] / by_key[("zmq-push", same_link)]["groups_per_s"]
        row["vs_mp_queue"] = row["groups_per_s"] / by_key[("mp-queue", "pipe")]["groups_per_s"]
    print(format_table(rows, ["method", "link", "message_kb", "groups_per_s", "mb_per_s", "vs_zmq_push",
                              "vs_mp_queue", "consumer_cpu_us"]))
    print(f"load average (1 min) at the end: {rows[0]['load_avg_1m']:.2f} on {os.cpu_count()} cores")
    print(f"wrote {write_rows(args.out, rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
