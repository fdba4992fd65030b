"""What the receiver admits, over tcp and ipc: a frame from a connection that never said Hello, one that
claims another producer or runs past its credit, garbage of every kind, floods, too many producers and
oversized messages are dropped and counted, and the legitimate streams go on untouched.

Each case once broke the learner: a stranger's frame claiming `producer="rollout-0", seq=10**9` made the
receiver drop the real producer's next groups as duplicates; one undecodable frame raised out of `recv`;
a producer past its credit was buffered without bound."""

from __future__ import annotations

import os
import random
import stat
import threading
import time

import msgspec
import pytest
import zmq
from transport_producer import RawPeer, make_message

from medvl_engine.transport.messages import Credit, ImageData, RolloutGroup, encode
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender


def big_group(producer: str, seq: int, tokens: int) -> RolloutGroup:
    return RolloutGroup.build(
        producer=producer, seq=seq, prompt_id=f"{producer}-{seq}", dataset_name="slake", dataset_index=seq,
        weight_version=0, answer_label="A", prompt_ids=[1, 2], response_ids=[range(tokens)], logprobs=[None],
        texts=["<answer>A</answer>"], finish_reasons=["stop"], rewards=[1.0], correct=[True], format_ok=[True],
        letters=["A"])


def send_all(sender: GroupSender, total: int) -> threading.Thread:
    """The legitimate producer, in a thread: it waits for credit while this thread consumes."""

    def run() -> None:
        for seq in range(total):
            sender.send(make_message(sender.producer_id, seq), timeout=10)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_strangers_claims_cannot_touch_a_producers_stream(endpoint, closing, settle):
    total = 150
    with GroupReceiver(endpoint, credits=8, insecure=True) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
        producing = closing(send_all(sender, total))
        got = [receiver.recv(timeout=10) for _ in range(10)]
        # One frame from a connection that never said Hello, claiming the producer and a far position.
        stranger = closing(RawPeer(receiver.endpoint))
        stranger.sock.send(encode(make_message("rollout-0", 10**9)))
        # A connection that said Hello as itself, then sends as rollout-0 and past its own credit.
        impostor = closing(RawPeer(receiver.endpoint, "evil", hello=True))
        impostor.sock.send(encode(make_message("rollout-0", len(got) + 1)))
        impostor.sock.send(encode(make_message("evil", 10**9)))
        got += [receiver.recv(timeout=10) for _ in range(total - 10)]
        producing.join(10)
        settle(receiver, lambda stats: sum(stats.dropped.values()) >= 3)
        stats = receiver.stats
    assert [msg.seq for msg in got] == list(range(total))
    assert all(msg == make_message("rollout-0", msg.seq) for msg in got)
    producer = stats.producers["rollout-0"]
    assert (producer.duplicates, producer.lost, producer.sessions) == (0, 0, 1)
    assert stats.producers["evil"].next_seq == 0
    assert stats.dropped == {"no_hello": 1, "wrong_producer": 1, "over_credit": 1}


GARBAGE = {
    "random bytes": ("invalid", [random.Random(7).randbytes(300)]),
    "invalid opcode": ("undecodable", [b"\xc1garbage"]),
    "wrong type tag": ("invalid", [msgspec.msgpack.encode({"type": "bogus", "producer": "rollout-0", "seq": 0})]),
    "huge declared length": ("undecodable", [b"\xdf\xff\xff\xff\xff" + msgspec.msgpack.encode("type")
                                             + msgspec.msgpack.encode("group")]),
    "multipart": ("multipart", [encode(make_message("rollout-0", 0)), b"second frame"]),
    "empty frame": ("undecodable", [b""]),
    "a receiver's message": ("unexpected_type", [encode(Credit(producer="rollout-0", credits=10**6, next_seq=0))]),
}


@pytest.mark.parametrize("case", GARBAGE)
def test_garbage_is_dropped_and_the_stream_goes_on(endpoint, case, caplog, closing, settle):
    reason, frames = GARBAGE[case]
    with GroupReceiver(endpoint, credits=4, insecure=True) as receiver:
        peer = closing(RawPeer(receiver.endpoint))
        peer.sock.send_multipart(frames)
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
        producing = closing(send_all(sender, 6))
        got = [receiver.recv(timeout=10).seq for _ in range(6)]
        producing.join(10)
        settle(receiver, lambda stats: stats.dropped)
        stats = receiver.stats
    assert got == list(range(6))
    assert stats.dropped == {reason: 1}
    assert f"({reason}; 1 so far)" in caplog.text and "dropped a frame from a connection" in caplog.text


def test_messages_of_impossible_shape_are_dropped(endpoint, closing):
    """msgspec checks types; a rewards buffer shorter than the answers, or an image with fewer bytes than its
    size says, would crash the learner later."""
    with GroupReceiver(endpoint, credits=4, insecure=True) as receiver:
        peer = closing(RawPeer(receiver.endpoint, "rollout-0", hello=True))
        short = make_message("rollout-0", 0)
        short.rewards = short.rewards[:-1]
        peer.sock.send(encode(short))
        torn = make_message("rollout-0", 0)
        torn.images = [ImageData(mode="RGB", width=4, height=4, data=bytes(47))]
        peer.sock.send(encode(torn))
        peer.sock.send(encode(make_message("rollout-0", 0)))
        assert receiver.recv(timeout=10) == make_message("rollout-0", 0)
        assert receiver.stats.dropped == {"invalid": 2}


def test_a_producer_past_its_credit_is_cut_to_its_window(endpoint, closing):
    """(Once: with credits=8, 400 groups of 512 KB were all buffered.) 200 groups of 64 KB sent at once;
    at most `credits` are ever held, everything else is refused and counted, none delivered twice."""
    credits, total = 4, 200
    with GroupReceiver(endpoint, credits=credits, on_gap="count", insecure=True) as receiver:
        peer = closing(RawPeer(receiver.endpoint, "flood", hello=True))
        for seq in range(total):
            peer.sock.send(encode(big_group("flood", seq, tokens=16_000)))
        got = []
        try:
            while True:
                got.append(receiver.recv(timeout=1).seq)
        except TimeoutError:
            pass
        stats = receiver.stats
    assert got[:credits] == list(range(credits)) and got == sorted(set(got))
    assert stats.producers["flood"].max_buffered <= credits
    assert stats.dropped["over_credit"] + len(got) == total
    assert stats.dropped["over_credit"] >= total // 2


def test_producers_past_the_cap_are_refused(endpoint, closing, settle):
    """(Once: 3000 fake producers were all kept.)"""
    with GroupReceiver(endpoint, credits=4, max_producers=3, insecure=True) as receiver:
        peers = [closing(RawPeer(receiver.endpoint, f"p{i}", hello=True)) for i in range(5)]
        for i, peer in enumerate(peers):
            peer.sock.send(encode(make_message(f"p{i}", 0)))
        got = [receiver.recv(timeout=10).producer for _ in range(3)]
        settle(receiver, lambda stats: sum(stats.dropped.values()) >= 4)
        assert sorted(receiver.positions()) == sorted(got)
        assert receiver.stats.dropped == {"too_many_producers": 2, "no_hello": 2}


def test_an_oversized_message_never_arrives(endpoint, closing):
    """(Once: a 64 MB frame was accepted.) libzmq cuts the connection that sends it; a GroupSender, told
    the limit in its Credit, refuses to send one."""
    limit = 1 << 20
    with GroupReceiver(endpoint, credits=4, max_message_bytes=limit, insecure=True) as receiver:
        peer = closing(RawPeer(receiver.endpoint, "big", hello=True))
        peer.sock.send(encode(big_group("big", 0, tokens=limit // 2)))  # 2 MB of token ids
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
        producing = closing(send_all(sender, 3))
        assert [receiver.recv(timeout=10).producer for _ in range(3)] == ["rollout-0"] * 3
        producing.join(10)
        with pytest.raises(ValueError, match=f"over the {limit} bytes the receiver"):
            sender.send(big_group("", -1, tokens=limit // 2))
        assert sender.next_seq == 3  # the refused message took no number
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.3)
        assert "big" not in receiver.stats.producers or receiver.stats.producers["big"].next_seq == 0


def test_a_flood_of_garbage_does_not_hold_recv_past_its_timeout(closing):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, insecure=True) as receiver:
        peer = closing(RawPeer(receiver.endpoint))
        stop = threading.Event()

        def flood() -> None:
            while not stop.is_set():
                try:
                    peer.sock.send(b"\xc1garbage", zmq.NOBLOCK)
                except zmq.Again:  # the receiver stopped reading: libzmq holds no more of it
                    time.sleep(0.001)

        thread = threading.Thread(target=flood, daemon=True)
        thread.start()
        started = time.monotonic()
        try:
            with pytest.raises(TimeoutError):
                receiver.recv(timeout=0.5)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            thread.join(5)
        assert receiver.stats.dropped["undecodable"] > 0
    assert elapsed < 3


def test_ipc_sockets_are_owner_only(tmp_path):
    """(Once created with the umask's permissions: 0755 or 0775, open to every local user.)"""
    umask = os.umask(0o022)
    try:
        with GroupReceiver(f"ipc://{tmp_path}/r.sock", insecure=True):
            assert stat.S_IMODE(os.stat(tmp_path / "r.sock").st_mode) == 0o600
        # A sender may bind too; its constructor waits until a receiver connects to take the Hello.
        made = []
        binding = threading.Thread(target=lambda: made.append(
            GroupSender(f"ipc://{tmp_path}/s.sock", "w0", connect=False, linger_s=0, insecure=True)), daemon=True)
        binding.start()
        deadline = time.monotonic() + 10
        while not (tmp_path / "s.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stat.S_IMODE(os.stat(tmp_path / "s.sock").st_mode) == 0o600
        with GroupReceiver(f"ipc://{tmp_path}/s.sock", bind=False, insecure=True):
            binding.join(10)
            made[0].close()
        assert os.umask(0o022) == 0o022, "binding changed the process's umask for good"
    finally:
        os.umask(umask)
    with pytest.raises(ValueError, match="abstract ipc socket"):
        GroupReceiver("ipc://@medvl-test", insecure=True)
