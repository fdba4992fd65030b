"""The transport's part of a torch.distributed weight push: a WeightVersion carries the buckets, a producer
answers `WeightsLoaded`, and `GroupReceiver.wait_for` waits for Hellos and for those answers while the
groups that arrive meanwhile stay for `recv`."""

from __future__ import annotations

import pytest

from medvl_engine.transport.messages import RolloutGroup, WeightBucket, WeightsLoaded, WeightVersion, decode, encode
from medvl_engine.transport.protocol import AUTO_SEQ
from medvl_engine.transport.receiver import GroupReceiver
from medvl_engine.transport.sender import GroupSender


def group() -> RolloutGroup:
    return RolloutGroup.build(
        producer="", seq=AUTO_SEQ, prompt_id="q", dataset_name="d", dataset_index=0, weight_version=1,
        answer_label="A", prompt_ids=[1], response_ids=[[2], [3]], logprobs=[None, None], texts=["a", "b"],
        finish_reasons=["stop", "stop"], rewards=[0.0, 1.0], correct=[False, True], format_ok=[True, True],
        letters=["A", "B"])


def test_the_buckets_and_the_answer_survive_the_wire():
    update = WeightVersion(version=3, window=8, buckets=[WeightBucket(names=["w"], dtypes=["bfloat16"],
                                                                      shapes=[[2, 3]])])
    assert decode(encode(update)) == update
    assert decode(encode(WeightVersion(version=1))).buckets == []
    assert decode(encode(WeightsLoaded(producer="w0", version=3))) == WeightsLoaded(producer="w0", version=3)


def test_wait_for_hellos_then_for_the_loaded_version():
    with GroupReceiver("tcp://127.0.0.1:*", credits=4, insecure=True) as receiver:
        with pytest.raises(TimeoutError, match="w0 not said Hello"):
            receiver.wait_for(["w0"], timeout=0.2)
        sender = GroupSender(receiver.endpoint, "w0", linger_s=0, insecure=True)
        try:
            receiver.wait_for(["w0"], timeout=5)  # its Hello answered: the sender's handshake completes
            assert sender.handshake(timeout=5) == 0
            receiver.announce(WeightVersion(version=1, buckets=[WeightBucket(names=["w"], dtypes=["float32"],
                                                                             shapes=[[1]])]))
            assert sender.poll_weight_version(timeout=5).buckets[0].names == ["w"]
            sender.send(group(), timeout=5)
            with pytest.raises(TimeoutError, match="w0 not reported weights v1 loaded"):
                receiver.wait_for(["w0"], 1, timeout=0.3)
            sender.report_loaded(1)
            receiver.wait_for(["w0"], 1, timeout=5)
            assert receiver.stats.producers["w0"].weight_version == 1
            assert receiver.recv(timeout=5).prompt_id == "q"  # read while waiting, kept for recv
        finally:
            sender.close()
