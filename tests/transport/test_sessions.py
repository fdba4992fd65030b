"""How a session ends, from both sides: the learner's `Stop` (finished, a protocol violation, an id it assigned no
shard) reaches the producer as `Stopped`; a producer whose receiver went away sees the connection down
(`receiver_down_s`); heartbeats keep `last_seen` fresh; positions outside the assigned shard are refused.

(Once a worker started by hand kept running for minutes after its learner had finished or died, and the
receiver accepted any position from any producer.)"""

from __future__ import annotations

import time

import pytest
from transport_producer import handshake

from medvl_engine.transport.messages import RolloutError
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender, Stopped

SHARDS = {"rollout-0": (0, 2), "rollout-1": (1, 2)}


def error(seq: int, position: int) -> RolloutError:
    return RolloutError(producer="", seq=seq, prompt_id=f"q{position}", reason="timeout", position=position)


def stopped(sender: GroupSender, receiver: GroupReceiver | None = None) -> Stopped:
    for _ in range(200):
        if receiver is not None:
            with pytest.raises(TimeoutError):
                receiver.recv(timeout=0.02)
        try:
            sender.poll_weight_version(timeout=0.02)
        except Stopped as exc:
            return exc
    raise AssertionError("no Stop within 10 s")


def test_a_finished_learner_tells_its_producers_and_a_vanished_one_is_seen_down(endpoint, closing):
    receiver = GroupReceiver(endpoint, credits=4, shards=SHARDS, strict=True, insecure=True)
    sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
    assert handshake(receiver, sender) == 0 and sender.receiver_down_s == 0.0
    receiver.close("the run reached step 4")
    exc = stopped(sender)
    assert exc.kind == "finished" and "the run reached step 4" in str(exc)
    deadline = time.monotonic() + 10
    while sender.receiver_down_s == 0.0:  # the receiver's socket is gone: the connection is down
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    assert sender.receiver_down_s >= 0.25


def test_a_producer_outside_its_shard_loses_its_session_and_is_told_why(endpoint, closing):
    with GroupReceiver(endpoint, credits=4, shards=SHARDS, strict=True, insecure=True) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-1", linger_s=0, insecure=True))
        assert handshake(receiver, sender) == 0 and sender.shard == (1, 2)
        sender.send(error(0, 1), timeout=5)
        assert receiver.recv(timeout=5).position == 1
        sender.send(error(1, 2), timeout=5)  # position 2 is rollout-0's
        exc = stopped(sender, receiver)
        assert exc.kind == "session_ended" and "wrong_shard" in str(exc) and "shard 1 of 2" in str(exc)
        assert receiver.stats.dropped == {"wrong_shard": 1}
        assert receiver.positions() == {"rollout-1": 1}  # a new process of it resumes at seq 1


def test_an_id_without_a_shard_is_told_which_ids_the_learner_has(endpoint, closing):
    with GroupReceiver(endpoint, credits=4, shards=SHARDS, strict=True, insecure=True) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-5", linger_s=0, insecure=True))
        for _ in range(50):
            with pytest.raises(TimeoutError):
                receiver.recv(timeout=0.02)
            with pytest.raises((TimeoutError, Stopped)) as raised:
                sender.handshake(timeout=0.02)
            if raised.type is Stopped:
                break
        assert raised.value.kind == "unknown_producer" and "rollout-0, rollout-1" in str(raised.value)
        assert receiver.stats.dropped == {"unknown_producer": 1} and receiver.stats.producers == {}


def test_heartbeats_keep_a_producer_seen(endpoint, closing):
    with GroupReceiver(endpoint, credits=4, shards=SHARDS, insecure=True) as receiver:
        sender = closing(GroupSender(receiver.endpoint, "rollout-0", linger_s=0, insecure=True))
        assert handshake(receiver, sender) == 0
        first = receiver.last_seen("rollout-0")
        assert first > 0 and receiver.last_seen("rollout-1") == 0.0
        time.sleep(0.1)
        sender.heartbeat()
        deadline = time.monotonic() + 5
        while receiver.last_seen("rollout-0") == first:
            assert time.monotonic() < deadline
            receiver.read_queued()
        assert receiver.last_seen("rollout-0") >= first + 0.1 and receiver.stats.dropped == {}
