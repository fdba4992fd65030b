"""A producer that breaks the protocol loses its session, never the learner's run; decoding is bounded.

The learner's side as `trainers/placement.py` builds it (a strict GroupReceiver behind a TransportFeed and an
OrderedSource), over ipc, with two honest GroupSenders streaming positions 0..15 and one hostile peer. Each
case once stopped training or cost the learner ~20x a frame's size in memory:
(a) a new producer's message within its credit with a skipped sequence number raised SequenceGap out of
    `source.next`; (b) a RolloutError without a stream position raised ValueError out of `OrderedSource._take`;
(c) a 4 MB frame of short strings from a connection that never said Hello was decoded (+79 MB) before it
    was dropped."""

from __future__ import annotations

import tempfile
import threading
import time
import tracemalloc

import msgspec
import pytest
from transport_producer import RawPeer

from medvl_engine.trainers.sources import OrderedSource, TransportFeed
from medvl_engine.transport.messages import (
    MAX_ANSWERS,
    MAX_IMAGES,
    ImageData,
    RolloutError,
    RolloutGroup,
    decode,
    encode,
)
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender

PRODUCERS, PER_PRODUCER = 2, 8
TOTAL = PRODUCERS * PER_PRODUCER


def group(producer: str, seq: int, position: int) -> RolloutGroup:
    return RolloutGroup.build(
        producer=producer, seq=seq, prompt_id=f"q{position}", dataset_name="slake", dataset_index=position,
        weight_version=0, answer_label="A", prompt_ids=[1, 2, 3], response_ids=[[4, 5], [6]],
        logprobs=[[-0.5, -0.5], None], texts=["<answer>A</answer>", "B"], finish_reasons=["stop", "stop"],
        rewards=[1.0, 0.0], correct=[True, False], format_ok=[True, True], letters=["A", "B"], position=position)


@pytest.fixture
def learner():
    """The learner's source over ipc, fed by two honest producers (worker i of 2 sends positions i, i+2, ...)."""
    with tempfile.TemporaryDirectory(prefix="medvl-") as folder:
        receiver = GroupReceiver(f"ipc://{folder}/groups.sock", credits=8, strict=True, insecure=True)
        source = OrderedSource(TransportFeed(receiver), rank=0, prompts_per_step=TOTAL, max_staleness=0,
                               dynamic_sampling=False, timeout=20)
        senders = [GroupSender(receiver.endpoint, f"w{i}", linger_s=0, insecure=True) for i in range(PRODUCERS)]

        def produce(i: int) -> None:
            for seq in range(PER_PRODUCER):
                senders[i].send(group(f"w{i}", seq, seq * PRODUCERS + i), timeout=20)

        threads = [threading.Thread(target=produce, args=(i,), daemon=True) for i in range(PRODUCERS)]
        for thread in threads:
            thread.start()
        yield source, receiver
        for thread in threads:
            thread.join(10)
        for sender in senders:
            sender.close()
        receiver.close()


def take_all_and_settle(source: OrderedSource, receiver: GroupReceiver, done) -> None:
    """Every honest group once, in stream order; then read on until `done(dropped)` (frames of different
    connections arrive in no fixed order)."""
    groups = source.next(TOTAL, version=0)
    assert [g.position for g in groups] == list(range(TOTAL))
    assert all(g == group(g.producer, g.position // PRODUCERS, g.position) for g in groups)
    deadline = time.monotonic() + 10
    while not done(receiver.stats.dropped):
        assert time.monotonic() < deadline, f"not settled: dropped {receiver.stats.dropped}"
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.05)
    stats = receiver.stats
    assert stats.delivered == TOTAL and stats.duplicates == 0 and stats.lost == 0
    assert all(stats.producers[f"w{i}"].next_seq == PER_PRODUCER for i in range(PRODUCERS))


def test_a_sequence_gap_ends_the_producers_session_not_the_run(learner, caplog):
    source, receiver = learner
    evil = RawPeer(receiver.endpoint, "evil", hello=True)
    try:
        evil.sock.send(encode(group("evil", 1, 3)))  # within its credit, seq 0 skipped
        evil.sock.send(encode(group("evil", 0, 5)))  # after its session ended
        take_all_and_settle(source, receiver, lambda dropped: dropped.get("no_hello"))
    finally:
        evil.close()
    assert receiver.stats.dropped == {"sequence_gap": 1, "no_hello": 1}
    assert receiver.stats.producers["evil"].next_seq == 0  # its next session would resume at 0
    assert "from producer 'evil'" in caplog.text and "(sequence_gap; 1 so far); its session ended" in caplog.text


def test_a_message_without_a_stream_position_ends_the_producers_session(learner, caplog):
    source, receiver = learner
    evil = RawPeer(receiver.endpoint, "evil", hello=True)
    try:
        evil.sock.send(encode(RolloutError(producer="evil", seq=0, prompt_id="q?", reason="no position")))
        far = group("evil", 0, 10**9)  # a position the learner would buffer for ever
        stranger = RawPeer(receiver.endpoint, "far", hello=True)
        stranger.sock.send(encode(RolloutGroup(**{**msgspec.structs.asdict(far), "producer": "far"})))
        take_all_and_settle(source, receiver, lambda dropped: len(dropped) == 2)
        stranger.close()
    finally:
        evil.close()
    assert receiver.stats.dropped == {"no_position": 1, "outside_window": 1}
    assert source.stats.errors == 0 and source.stats.invalid == 0
    assert "from producer 'evil'" in caplog.text and "(no_position; 1 so far)" in caplog.text


def short_strings_frame(size: int) -> bytes:
    """A group-shaped frame of `size` bytes whose texts are ~1.4 M strings of 2 characters."""
    body = msgspec.structs.asdict(group("evil", 0, 0))
    body["texts"] = ["ab"] * (size // 3)
    return msgspec.msgpack.encode({"type": "group", **body})


def test_a_large_frame_is_not_decoded_before_its_hello_nor_past_its_limits(learner):
    source, receiver = learner
    frame = short_strings_frame(4 << 20)
    stranger = RawPeer(receiver.endpoint)
    evil = RawPeer(receiver.endpoint, "evil", hello=True)
    tracemalloc.start()
    try:
        stranger.sock.send(frame)
        evil.sock.send(frame)
        take_all_and_settle(source, receiver, lambda dropped: len(dropped) == 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        stranger.close()
        evil.close()
    assert receiver.stats.dropped == {"no_hello": 1, "oversized": 1}
    assert peak < len(frame)  # (once +79 MB for this 4 MB frame)


def worst_case_frame(cap: int) -> bytes:
    """The most heap per byte a receiver with frame cap `cap` accepts: every list at its limit, of minimal
    items (empty strings and buffers, 1x1 images), and the rest of the frame in the answers' text."""
    n = MAX_ANSWERS
    msg = RolloutGroup(
        producer="w0", seq=0, prompt_id="", dataset_name="", dataset_index=0, weight_version=0, answer_label="",
        prompt_ids=b"", response_ids=[b""] * n, logprobs=[b""] * n, texts=[""] * n, finish_reasons=[""] * n,
        rewards=bytes(4 * n), correct=bytes(n), format_ok=bytes(n), letters=[""] * n, parsed=[""] * n,
        position=0, images=[ImageData(mode="L", width=1, height=1, data=b"\0")] * MAX_IMAGES)
    room = cap - len(encode(msg)) - 8 * n  # each text's msgpack header grows to 5 bytes
    msg.texts = ["x" * (room // n)] * n
    frame = encode(msg)
    assert cap - 8 * n <= len(frame) <= cap
    return frame


def test_decoding_the_worst_frame_at_the_cap_takes_at_most_4x_its_size():
    frame = worst_case_frame(4 << 20)
    tracemalloc.start()
    try:
        decoded = decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded.n == MAX_ANSWERS
    assert peak <= 4 * len(frame), f"{peak / len(frame):.2f}x"


def test_the_largest_legitimate_fields_still_decode():
    image = ImageData(mode="RGBA", width=2048, height=2048, data=bytes(4 * 2048 * 2048))  # 16 MiB of pixels
    msg = group("w0", 0, 0)
    msg.images = [image]
    msg.response_ids = [bytes(4 * 131072)] * 2  # 128 Ki tokens each
    msg.logprobs = [bytes(4 * 131072), b""]
    assert decode(encode(msg)) == msg
    with pytest.raises(msgspec.ValidationError, match="length <="):
        decode(encode(RolloutGroup(**{**msgspec.structs.asdict(msg), "texts": ["a"] * (MAX_ANSWERS + 1)})))


def flood_group(producer: str, seq: int, position: int, size: int = 64 << 10) -> RolloutGroup:
    msg = group(producer, seq, position)
    msg.texts = ["x" * size, "B"]
    return msg


def test_a_flood_of_far_positions_costs_the_learner_nothing_and_a_restart_regenerates(tmp_path):
    """The learner's source exactly as `grpo` builds it (three shards, credits 4, window 8). rollout-2, obeying
    its credits, sends 500 groups of 64 KB for positions >= 1,000,000: the first ends its session, the rest are
    dropped unread, and the source holds none of them (once it buffered all 500, 32 MB, waiting for position 0).
    Its positions are then regenerated by a new process of it, and the step completes."""
    from types import SimpleNamespace

    from medvl_engine import config as config_lib
    from medvl_engine.trainers.config import GRPOConfig
    from medvl_engine.trainers.placement import build_source

    with tempfile.TemporaryDirectory(prefix="medvl-") as folder:
        cfg = config_lib.build(GRPOConfig, {
            "model": {"path": "smollm2"}, "data": {"source": "bundled"}, "output": str(tmp_path / "run"),
            "transport": {"endpoint": f"ipc://{folder}/groups.sock", "workers": 0, "shards": 3, "credits": 4},
            "algo": {"prompts_per_step": 8, "mini_batches": 1}, "rollout": {"max_staleness": 0}})
        source = build_source(cfg, SimpleNamespace(rank=0), None)
        receiver = source.feed.receiver
        honest = [GroupSender(receiver.endpoint, f"rollout-{k}", linger_s=0) for k in range(2)]
        flooder = GroupSender(receiver.endpoint, "rollout-2", linger_s=0)
        try:
            def produce(sender: GroupSender, k: int, count: int) -> None:
                # As a rollout worker does: positions 3 seq + k, each once the learner's window has opened it.
                window = 0
                for seq in range(count):
                    while window <= 3 * seq + k:
                        update = sender.poll_weight_version(timeout=20)
                        assert update is not None, "no window"
                        window = update.window
                    sender.send(group(f"rollout-{k}", seq, 3 * seq + k), timeout=20)

            threads = [threading.Thread(target=produce, args=(honest[k], k, 3), daemon=True) for k in range(2)]
            for thread in threads:
                thread.start()
            def flood_it() -> None:  # within its credit (its window is 4), but past every window the learner opens
                flooder.handshake(timeout=20)
                for seq in range(500):
                    flooder._sock.send(encode(flood_group("rollout-2", seq, 10**6 + seq)))

            flood = threading.Thread(target=flood_it, daemon=True)
            tracemalloc.start()
            flood.start()
            deadline = time.monotonic() + 30
            while receiver.stats.dropped.get("no_hello", 0) + receiver.stats.dropped.get("wrong_shard", 0) < 500:
                assert time.monotonic() < deadline, receiver.stats.dropped
                source.feed.check()
                with pytest.raises(TimeoutError):
                    receiver.recv(timeout=0.05)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert receiver.stats.dropped == {"wrong_shard": 1, "no_hello": 499}
            assert peak < 2 << 20  # credits x message size x producers bounds it; none of the flood is held
            # rollout-2's next process (a restart) resumes where the learner stands and regenerates its positions.
            flooder.close()
            flooder = GroupSender(receiver.endpoint, "rollout-2", linger_s=0)
            restarted = threading.Thread(target=produce, args=(flooder, 2, 2), daemon=True)
            restarted.start()
            groups = source.next(8, version=0)
            assert [g.position for g in groups] == list(range(8))
            for thread in (*threads, restarted):
                thread.join(10)
        finally:
            for sender in (*honest, flooder):
                sender.close()
            source.close()
