"""ZeroMQ transport of scored rollout groups (msgspec messages, credit flow control, sequence numbers).

The consumer side is `GroupReceiver` (an iterator of RolloutGroup / RolloutError), the producer side
`GroupSender`; `protocol.py` documents the protocol, what the receiver admits and the restart contract;
`keys.py` writes (`medvl-engine keys DIR`) and loads the CURVE keys of tcp transport.
"""

from medvl_engine.transport.messages import Credit, Goodbye, Hello, RolloutError, RolloutGroup, WeightVersion
from medvl_engine.transport.protocol import AUTO_SEQ, ProtocolError, SequenceGap, TransportError
from medvl_engine.transport.receiver import GroupReceiver, ProducerStats, ReceiverStats
from medvl_engine.transport.sender import GroupSender, SenderStats

__all__ = [
    "AUTO_SEQ",
    "Credit",
    "Goodbye",
    "GroupReceiver",
    "GroupSender",
    "Hello",
    "ProducerStats",
    "ProtocolError",
    "ReceiverStats",
    "RolloutError",
    "RolloutGroup",
    "SenderStats",
    "SequenceGap",
    "TransportError",
    "WeightVersion",
]
