"""The channel's protocol in one process: handshake, sequence stamping, credit limits, weight
announcements, duplicates and gaps, restarts, and the errors bad peers and bad arguments get.

`RawPeer` is a bare DEALER socket that speaks the protocol by hand, so a test can send what a correct
GroupSender never would (a repeated or skipped sequence number, undecodable bytes)."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

from medvl_engine.transport.messages import Credit, Hello, RolloutError, RolloutGroup, WeightVersion, decode, encode
from medvl_engine.transport.protocol import AUTO_SEQ, SequenceGap, TransportError
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender


def group(seq: int = AUTO_SEQ, producer: str = "", tokens: int = 3) -> RolloutGroup:
    return RolloutGroup.build(
        producer=producer, seq=seq, prompt_id=f"q{seq}", dataset_name="slake", dataset_index=7, weight_version=2,
        answer_label="B", prompt_ids=[5, 6, 7], response_ids=[list(range(tokens)), [9]],
        logprobs=[[-0.5] * tokens, None], texts=["<answer>B</answer>", "A"], finish_reasons=["stop", "length"],
        rewards=[1.0, 0.0], correct=[True, False], format_ok=[True, False], letters=["B", "A"])


@pytest.fixture
def receiver():
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, insecure=True) as rec:
        yield rec


@pytest.fixture
def connect():
    """Makes senders whose handshake the receiver has answered (it answers while it waits in recv); all
    are closed at teardown, so a failing test cannot leave a socket that blocks the interpreter's exit."""
    senders = []

    def make(receiver: GroupReceiver, producer: str = "w0", **kwargs) -> GroupSender:
        senders.append(GroupSender(receiver.endpoint, producer, linger_s=0, **kwargs, insecure=True))
        with pytest.raises(TimeoutError):
            receiver.recv(timeout=0.2)
        senders[-1].handshake(timeout=5)
        return senders[-1]

    yield make
    for sender in senders:
        sender.close()


class RawPeer:
    """A hand-driven DEALER: sends exactly the frames a test gives it."""

    def __init__(self, endpoint: str, producer: str) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.ROUTING_ID, f"{producer}/{os.getpid()}".encode())
        self.sock.connect(endpoint)
        self.producer = producer
        self.sock.send(encode(Hello(producer=producer, pid=os.getpid())))

    def send(self, *seqs: int) -> None:
        for seq in seqs:
            self.sock.send(encode(group(seq, self.producer)))

    def recv(self):
        assert self.sock.poll(5000), "nothing came back from the receiver"
        return decode(self.sock.recv())

    def close(self) -> None:
        self.sock.close(linger=1000)
        self.context.term()


def test_group_arrives_intact_and_numbered(receiver, connect):
    sender = connect(receiver)
    assert sender.next_seq == 0
    sent = group(tokens=5000)  # 40 KB of buffers: over pyzmq's zero-copy threshold
    assert sender.send(sent) == 0 and sent.seq == 0 and sent.producer == "w0"
    assert sender.send(RolloutError(producer="w0", seq=1, prompt_id="q1", reason="timeout", attempts=3)) == 1
    got = receiver.recv(timeout=5)
    assert got == sent
    assert got.response_array(0).tolist() == list(range(5000))
    assert got.logprob_array(1) is None
    error = receiver.recv(timeout=5)
    assert isinstance(error, RolloutError) and (error.seq, error.reason) == (1, "timeout")
    sender.close()


def test_sender_blocks_at_its_credit_and_resumes_when_consumed(receiver, connect):
    sender = connect(receiver)
    for _ in range(4):
        sender.send(group(), timeout=1)
    with pytest.raises(TimeoutError, match="no credit for seq 4"):
        sender.send(group(), timeout=0.3)
    assert sender.next_seq == 4  # the refused message took no number
    assert receiver.recv(timeout=5).seq == 0  # consuming one grants one (quarter window of 4 = 1)
    assert sender.send(group(), timeout=5) == 4
    assert sender.stats.max_outstanding == 4 and sender.stats.credit_waits >= 1
    assert [receiver.recv(timeout=5).seq for _ in range(4)] == [1, 2, 3, 4]
    sender.close()


def test_close_waits_until_the_receiver_has_everything(receiver, connect):
    """Closing a TCP socket with a Credit unread in it resets the connection, and the reset drops what the
    receiver's kernel still held of the stream; so a closing sender says Goodbye and waits for the Credit
    that answers it (the receiver answers whenever it reads its socket), or for `linger_s`."""
    sender = connect(receiver)
    for _ in range(3):
        sender.send(group(), timeout=1)
    closer = threading.Thread(target=sender.close, kwargs={"linger_s": 10})
    closer.start()
    closer.join(0.3)
    assert closer.is_alive()  # the receiver has not read since: nothing is confirmed yet
    assert [receiver.recv(timeout=5).seq for _ in range(3)] == [0, 1, 2]
    closer.join(5)
    assert not closer.is_alive()
    unanswered = connect(receiver, "w1")
    unanswered.send(group(), timeout=1)
    started = time.monotonic()
    unanswered.close(linger_s=0.3)  # nobody reads the Goodbye: the wait ends at linger_s
    assert 0.25 <= time.monotonic() - started < 3


def test_wrong_position_or_producer_is_refused(receiver, connect):
    sender = connect(receiver)
    with pytest.raises(ValueError, match="has seq 3 but the stream is at 0"):
        sender.send(group(seq=3))
    with pytest.raises(ValueError, match="belongs to producer 'w9'"):
        sender.send(group(producer="w9"))
    with pytest.raises(TypeError, match="not WeightVersion"):
        sender.send(WeightVersion(version=1))
    sender.close()


def test_weight_versions_reach_current_and_later_producers(receiver, connect):
    seen = []
    sender = connect(receiver, on_weights=seen.append)
    assert sender.poll_weight_version() is None
    receiver.announce(WeightVersion(version=1, path="ckpt/1"))
    receiver.announce(WeightVersion(version=2, path="ckpt/2"))
    with pytest.raises(ValueError, match="older than the announced 2"):
        receiver.announce(WeightVersion(version=1))
    sender.send(group(), timeout=5)
    update = sender.poll_weight_version(timeout=5)
    while update is not None and update.version < 2:
        update = sender.poll_weight_version(timeout=5)
    assert update == WeightVersion(version=2, path="ckpt/2")
    assert [w.version for w in seen] == [1, 2]
    assert sender.poll_weight_version() is None and sender.consumer_version == 2
    assert receiver.recv(timeout=5).seq == 0
    late = connect(receiver, "w1")
    assert late.poll_weight_version(timeout=5) == WeightVersion(version=2, path="ckpt/2")
    sender.close()
    late.close()


def test_restarted_producer_resumes_where_the_receiver_stands(receiver, connect):
    first = connect(receiver)
    for _ in range(3):
        first.send(group(), timeout=1)
    first.close(linger_s=5)  # the three messages leave before the process "dies"
    assert [receiver.recv(timeout=5).seq for _ in range(3)] == [0, 1, 2]
    second = connect(receiver)
    assert second.stats.resumed_from == 3
    assert second.send(group(), timeout=1) == 3
    assert receiver.recv(timeout=5).seq == 3
    assert receiver.stats.producers["w0"].sessions == 2
    assert receiver.positions() == {"w0": 4}
    second.close()


def test_new_receiver_continues_from_saved_positions(connect):
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, start_seqs={"w0": 120}, insecure=True) as receiver:
        sender = connect(receiver)
        assert sender.next_seq == 120
        sender.send(group(), timeout=1)
        assert receiver.recv(timeout=5).seq == 120
        sender.close()


def test_duplicates_are_dropped_and_gaps_raised():
    with GroupReceiver("tcp://127.0.0.1:*", credits=8, insecure=True) as receiver:
        peer = RawPeer(receiver.endpoint, "raw")
        peer.send(0, 1, 1, 0, 2, 5, 6)  # all below the first Credit's limit of 8
        assert [receiver.recv(timeout=5).seq for _ in range(3)] == [0, 1, 2]
        with pytest.raises(SequenceGap, match="expected sequence number 3, received 5") as caught:
            receiver.recv(timeout=5)
        assert (caught.value.producer, caught.value.expected, caught.value.received) == ("raw", 3, 5)
        # the loss is accounted for and the stream goes on from the message after the gap
        assert [receiver.recv(timeout=5).seq for _ in range(2)] == [5, 6]
        stats = receiver.stats
        assert (stats.duplicates, stats.lost, stats.delivered) == (2, 2, 5)
        credit = peer.recv()
        assert isinstance(credit, Credit) and (credit.next_seq, credit.credits, credit.window) == (0, 8, 8)
        assert credit.max_message_bytes == 256 << 20
        peer.close()


def test_gaps_can_be_counted_instead():
    with GroupReceiver("tcp://127.0.0.1:*", credits=8, on_gap="count", insecure=True) as receiver:
        peer = RawPeer(receiver.endpoint, "raw")
        peer.send(0, 4)
        assert [receiver.recv(timeout=5).seq for _ in range(2)] == [0, 4]
        assert receiver.stats.producers["raw"].lost == 3
        peer.close()


def test_a_bad_frame_is_dropped_counted_and_logged_with_its_sender(receiver, caplog):
    """(Once raised ProtocolError out of recv, which stopped the learner.)"""
    peer = RawPeer(receiver.endpoint, "raw")
    peer.sock.send(b"\x93not msgpack of ours")
    peer.sock.send(encode(Credit(producer="raw", credits=1, next_seq=0)))
    peer.send(0)
    assert receiver.recv(timeout=5).seq == 0
    assert receiver.stats.dropped == {"invalid": 1, "unexpected_type": 1}
    # Named by its address, never by its routing id (ROUTER_HANDOVER gives the connection to whoever shows it).
    assert "dropped a frame from a connection at 127.0.0.1" in caplog.text and "raw/" not in caplog.text
    peer.close()


def test_bad_arguments_say_what_is_wrong():
    with pytest.raises(ValueError, match="credits must be a positive int"):
        GroupReceiver("tcp://127.0.0.1:*", credits=0, insecure=True)
    with pytest.raises(ValueError, match="on_gap must be"):
        GroupReceiver("tcp://127.0.0.1:*", on_gap="ignore", insecure=True)
    with pytest.raises(ValueError, match=r"start_seqs\['w0'\] must be an int >= 0"):
        GroupReceiver("tcp://127.0.0.1:*", start_seqs={"w0": -1}, insecure=True)
    with pytest.raises(ValueError, match="cannot bind 'tcp://nowhere'"):
        GroupReceiver("tcp://nowhere", insecure=True)
    with pytest.raises(ValueError, match="max_producers must be a positive int"):
        GroupReceiver("tcp://127.0.0.1:*", max_producers=0, insecure=True)
    with pytest.raises(ValueError, match="max_message_bytes must be a positive int"):
        GroupReceiver("tcp://127.0.0.1:*", max_message_bytes=-1, insecure=True)
    with pytest.raises(ValueError, match="producer_id must be a non-empty string"):
        GroupSender("tcp://127.0.0.1:5555", "", insecure=True)
    with pytest.raises(ValueError, match="cannot connect to 'carrier-pigeon://x'"):
        GroupSender("carrier-pigeon://x", "w0", insecure=True)
    sender = GroupSender("tcp://127.0.0.1:5555", "w0", insecure=True)
    with pytest.raises(TransportError, match="unknown before handshake"):
        _ = sender.next_seq
    with pytest.raises(ValueError, match="timeout must be None or >= 0"):
        sender.handshake(timeout=-1)
    sender.close(linger_s=0)
