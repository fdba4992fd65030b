"""ZeroMQ transport of scored rollout groups (msgspec messages, credit flow control, sequence numbers).

The consumer side is `GroupReceiver` (an iterator of RolloutGroup / RolloutError), the producer side
`GroupSender`; `channel.py` documents the protocol, what the receiver admits and the restart contract;
`keys.py` writes (`medvl-engine keys DIR`) and loads the CURVE keys of tcp transport.
"""

from medvl_engine.transport.channel import (
    AUTO_SEQ,
    GroupReceiver,
    GroupSender,
    ProducerStats,
    ProtocolError,
    ReceiverStats,
    SenderStats,
    SequenceGap,
    TransportError,
)
from medvl_engine.transport.messages import Credit, Goodbye, Hello, RolloutError, RolloutGroup, WeightVersion

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
