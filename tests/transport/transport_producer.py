"""A rollout-worker stand-in for the transport tests: streams deterministic groups through a GroupSender.

Run: python transport_producer.py ENDPOINT PRODUCER TOTAL [--delay-s SECONDS] [--garbage]

Message k of producer p is a pure function of (p, k) (`make_message`), so a test can check every byte
that arrives and a restarted process regenerates exactly what the dead one would have sent. Prints one
JSON line when the handshake tells it where to start and one with the sender's stats at the end.

With --garbage it is a hostile peer instead: TOTAL frames of every kind the receiver must drop (bytes that
are not msgpack, a wrong type tag, a huge declared length, multipart, a receiver's message, a stranger's
claim on worker-0's stream, an impostor's claim, a run past its credit), then one JSON line of counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
import zlib

import msgspec
import numpy as np
import zmq

from medvl_engine.transport.messages import Credit, Hello, RolloutError, RolloutGroup, encode
from medvl_engine.transport.sender import GroupSender


class RawPeer:
    """A hand-driven DEALER that sends exactly the frames a test gives it (a Hello only when asked)."""

    def __init__(self, endpoint: str, producer: str = "", *, hello: bool = False) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.connect(endpoint)
        if hello:
            self.sock.send(encode(Hello(producer=producer, pid=os.getpid())))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()


def handshake(receiver, sender: GroupSender, seconds: float = 10.0) -> int:
    """The receiver answers a Hello only while it reads: alternate until the sender has its Credit; returns
    the position the sender resumes at. (A message arriving meanwhile is an error: handshake first.)"""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            receiver.recv(timeout=0.02)
            raise AssertionError("a message arrived during a handshake")
        except TimeoutError:
            pass
        try:
            return sender.handshake(timeout=0.02)
        except TimeoutError:
            pass
    raise AssertionError(f"no handshake within {seconds} s")


def make_message(producer: str, seq: int) -> RolloutGroup | RolloutError:
    """Position `seq` of `producer`'s stream: a group of 1-8 answers of 0-64 tokens, or now and then an error."""
    rng = np.random.default_rng([zlib.crc32(producer.encode()), seq])
    if seq % 97 == 13:
        return RolloutError(producer=producer, seq=seq, prompt_id=f"{producer}-{seq}", reason="backend timed out",
                            attempts=3)
    n = int(rng.integers(1, 9))
    lengths = rng.integers(0, 65, size=n)
    rewards = rng.integers(0, 2, size=n).astype(np.float32)
    return RolloutGroup.build(
        producer=producer,
        seq=seq,
        prompt_id=f"{producer}-{seq}",
        dataset_name="pmc_vqa",
        dataset_index=seq,
        weight_version=0,
        answer_label="ABCD"[seq % 4],
        prompt_ids=rng.integers(0, 151_643, size=int(rng.integers(1, 32))),
        response_ids=[rng.integers(0, 151_643, size=int(t)) for t in lengths],
        logprobs=[None if i == 0 and seq % 5 == 0 else -rng.random(int(t)) for i, t in enumerate(lengths)],
        texts=[f"<answer>{'ABCD'[i % 4]}</answer> é{seq}" for i in range(n)],
        finish_reasons=["stop" if t < 64 else "length" for t in lengths],
        rewards=rewards,
        correct=rewards > 0,
        format_ok=np.ones(n, dtype=bool),
        letters=["ABCD"[i % 4] for i in range(n)],
    )


def send_garbage(endpoint: str, name: str, total: int) -> dict[str, int]:
    """`total` frames the receiver must drop, from a connection that never says Hello and from one that
    says Hello as `name`; returns how many of each kind were sent."""
    rng = random.Random(name)
    context = zmq.Context()
    stranger, impostor = context.socket(zmq.DEALER), context.socket(zmq.DEALER)
    for sock in (stranger, impostor):
        sock.connect(endpoint)
    impostor.send(encode(Hello(producer=name, pid=os.getpid())))
    kinds = {
        "random bytes": lambda: [rng.randbytes(rng.randrange(1, 2000))],
        "invalid opcode": lambda: [b"\xc1garbage"],
        "wrong type tag": lambda: [msgspec.msgpack.encode({"type": "bogus", "producer": "worker-0"})],
        "huge declared length": lambda: [b"\xdf\xff\xff\xff\xff" + msgspec.msgpack.encode("type")],
        "multipart": lambda: [encode(make_message("worker-0", 0)), b"tail"],
        "credit": lambda: [encode(Credit(producer="worker-0", credits=10**6, next_seq=0))],
        "stranger's claim": lambda: [encode(make_message("worker-0", rng.choice([0, 1, 10**9])))],
    }
    impostor_kinds = {
        "impostor's claim": lambda: [encode(make_message("worker-1", rng.randrange(0, 50)))],
        "past its credit": lambda: [encode(make_message(name, 10**6 + rng.randrange(1000)))],
    }
    sent = dict.fromkeys([*kinds, *impostor_kinds], 0)
    for i in range(total):
        kind = rng.choice([*kinds, *impostor_kinds])
        sock = impostor if kind in impostor_kinds else stranger
        sock.send_multipart({**kinds, **impostor_kinds}[kind]())
        sent[kind] += 1
        if i % 64 == 63:
            time.sleep(0.002)  # spread over the producers' run instead of arriving before it
    for sock in (stranger, impostor):
        sock.close(linger=5000)
    context.term()
    return sent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("endpoint")
    parser.add_argument("producer")
    parser.add_argument("total", type=int)
    parser.add_argument("--delay-s", type=float, default=0.0, help="pause before each send (a slow engine)")
    parser.add_argument("--garbage", action="store_true", help="send TOTAL frames the receiver must drop")
    args = parser.parse_args()
    if args.garbage:
        print(json.dumps(send_garbage(args.endpoint, args.producer, args.total)), flush=True)
        return 0
    sender = GroupSender(args.endpoint, args.producer, insecure=True)
    start = sender.handshake(timeout=30)
    print(json.dumps({"resumed_from": start}), flush=True)
    for seq in range(start, args.total):
        if args.delay_s:
            time.sleep(args.delay_s)
        sender.send(make_message(args.producer, seq), timeout=30)
    print(json.dumps(dataclasses.asdict(sender.stats)), flush=True)
    sender.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
