"""Who gets into the receiver at the door: the ZAP side that lets a CURVE handshake finish only for the holder
of a producer's key (and tags its frames with that producer's id), the throttle that logs refusals the 1st,
10th, 100th ... time, and what the receiver keeps of each producer it let in (`ProducerStats`, `ReceiverStats`).

What the receiver admits frame by frame (a Hello first, one producer per connection, within its credit)
is `GroupReceiver`'s, in `receiver.py`; `protocol.py` documents it."""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

log = logging.getLogger(__name__)


@dataclass
class ProducerStats:
    """One producer as the receiver sees it."""

    producer: str
    next_seq: int  # first sequence number not received yet
    consumed: int  # every sequence number below this was handed to the application
    buffered: int = 0  # received, not yet handed out
    max_buffered: int = 0
    sessions: int = 0  # Hellos: 1 + restarts
    duplicates: int = 0
    lost: int = 0
    pending_acks: int = 0
    granted: int = 0  # the limit the last Credit gave: the producer may send sequence numbers below it
    weight_version: int = 0  # the policy version its engine runs, as its Hello or its last WeightsLoaded said
    last_seen: float = 0.0  # time.monotonic() of its last frame the receiver accepted (a Heartbeat at the least)
    route: bytes = field(default=b"", repr=False)


@dataclass
class ReceiverStats:
    received: int = 0  # accepted messages
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    producers: dict[str, ProducerStats] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)  # frames refused, per reason (see protocol.py's docstring)


class _ProducerKeys:
    """The ZAP side of a CURVE receiver (called in pyzmq's authenticator thread): only connections with a
    producer's public key get in, and their frames carry that key's producer id as their User-Id."""

    def __init__(self, producers: dict[bytes, str], endpoint: str) -> None:
        self.producers = producers  # z85 public key -> producer id
        self.endpoint = endpoint
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.producers:
            return True
        self.refused += 1
        if _is_log_count(self.refused):
            # Not the key itself: logs are read by more people than the key folder is.
            log.warning("GroupReceiver on %s: refused a CURVE handshake with a key that is no producer's "
                        "(%d so far)", self.endpoint, self.refused)
        return False

    def user_id(self, key: bytes) -> str:
        """The User-Id libzmq attaches to every frame of an admitted connection: its producer id."""
        return self.producers[z85.encode(key)]


def _is_log_count(count: int) -> bool:
    """1, 10, 100, ...: a flood of bad frames is logged a handful of times, not once per frame."""
    return str(count).rstrip("0") == "1"


def end_session(routes: dict[bytes, ProducerStats], sessions: deque[bytes] | None, route: bytes,
                state: ProducerStats) -> None:
    """Forget connection `route` of `state`'s producer (a strict receiver's answer to a protocol violation):
    its later frames are dropped as `no_hello`, and it gets no more Credits. The producer keeps its position:
    a new process of it that says Hello resumes there (the restart contract), and gets what was lost again."""
    routes.pop(route, None)
    if sessions is not None and route in sessions:
        sessions.remove(route)
    if state.route == route:
        state.route = b""


def strict_violation(msg, next_seq: int, window: int) -> tuple[str, str] | None:
    """`(reason, detail)` when a strict receiver refuses stream message `msg` (its producer expects `next_seq`
    next; `window` is the first stream position the learner announced it does not consume yet, -1: none), or None.

    A message past a sequence gap is refused, not delivered: the receiver's position stays at the first
    missing number, so the producer's next session regenerates it (positions and seeds follow from it)."""
    what = f"{type(msg).__name__} {msg.prompt_id[:80]!r} (seq {msg.seq})"
    if msg.position < 0:
        return "no_position", f"{what} without a stream position"
    if 0 <= window <= msg.position:
        return "outside_window", f"{what} at stream position {msg.position}, at or past the window {window}"
    if msg.seq > next_seq:
        return "sequence_gap", (f"{what} while seq {next_seq} was expected: {msg.seq - next_seq} message(s) lost "
                                f"or skipped, which a restart of the producer regenerates from seq {next_seq}")
    return None


def peer_name(frame: zmq.Frame | None = None) -> str:
    """A connection as a log line names it: its address and its key's producer id where libzmq knows them.
    Never its routing id, which ROUTER_HANDOVER trusts: a log reader could take the connection over with it."""
    parts = []
    for prop, label in (("Peer-Address", "at"), ("User-Id", "with the key of")):
        try:
            value = frame.get(prop) if frame is not None else ""
        except zmq.ZMQError:
            value = ""
        if value:
            parts.append(f"{label} {value}")
    return "a connection" + (" " + " ".join(parts) if parts else "")
