"""A rollout-worker stand-in for the transport tests: streams deterministic groups through a GroupSender.

Run: python transport_producer.py ENDPOINT PRODUCER TOTAL [--delay-s SECONDS]

Message k of producer p is a pure function of (p, k) (`make_message`), so a test can check every byte
that arrives and a restarted process regenerates exactly what the dead one would have sent. Prints one
JSON line when the handshake tells it where to start and one with the sender's stats at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import zlib

import numpy as np

from medvl_engine.transport.channel import GroupSender
from medvl_engine.transport.messages import RolloutError, RolloutGroup


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("endpoint")
    parser.add_argument("producer")
    parser.add_argument("total", type=int)
    parser.add_argument("--delay-s", type=float, default=0.0, help="pause before each send (a slow engine)")
    args = parser.parse_args()
    sender = GroupSender(args.endpoint, args.producer)
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
