"""The ZeroMQ channel of scored rollout groups: `GroupSender` (rollout worker) -> `GroupReceiver` (learner).

Socket pattern: the receiver is a ROUTER, each sender a DEALER. The channel is two-way per producer
(groups flow to the learner; credits and weight announcements flow back, to one producer or to all),
and ROUTER/DEALER is the ZeroMQ pattern that gives every peer an address on one asynchronous
bidirectional connection. REQ/REP would allow one group per round trip (~130 us, far below the link's
~25k messages/s); PUSH/PULL is one-way and would need a second socket pair matched by hand; PUB/SUB
drops messages at its high-water mark. Either side may bind (`bind=` / `connect=`): `ipc://` on one
node, `tcp://` across nodes.

Protocol (messages in `medvl_engine.transport.messages`):
1. The sender connects and sends `Hello(producer, pid)`.
2. The receiver answers `Credit(producer, credits, next_seq, consumer_version, window)`: `next_seq` is
   the first sequence number of this producer it has not received, and the producer may send sequence
   numbers below `next_seq + credits`; then the latest `WeightVersion`, if one was announced.
3. The sender numbers its messages 0, 1, 2, ... per producer (`RolloutGroup` and `RolloutError` alike)
   and never goes past its limit, so at most `window` (the receiver's `credits=`) of its messages are in
   transit or waiting unconsumed in the receiver: a slow learner bounds the workers' memory.
4. The receiver grants credit as its application consumes messages: every `credits // 4` messages
   per producer, and, before it reads the socket, to every producer that has used up its credit. The
   sender looks for Credits when its credit runs under a quarter window (and every 8th send). Each
   Credit restates the whole limit, so a repeated Credit does no harm.
5. A closing sender sends `Goodbye`, and the receiver answers with a Credit whose `next_seq` says how
   much of the stream arrived; the sender closes once it is all there (or `linger_s` has passed).

Sequence numbers: the receiver delivers, per producer, 0, 1, 2, ... in order and each once. A message
below the expected number is a duplicate: dropped and counted (`stats.duplicates`). A message above it
means messages were lost: `recv` raises `SequenceGap` once (the loss is already counted in
`stats.lost`, the message is kept, and a caller that catches it may go on), or, with `on_gap="count"`,
only counts it.

Restart contract: a sequence number names a position in the producer's stream of prompts, not one
particular sample. A producer that restarts (a new process with the same `producer_id`) asks the
receiver where it stands, `sender.handshake()` returns that position, and the rollout side regenerates
from it: position k gets the same prompt as before. Messages the dead process had already put on the
wire may still arrive after the new one starts; the first copy of position k to arrive is delivered,
the other is dropped as a duplicate, so nothing is lost or delivered twice. One live process per
`producer_id`. The receiver must stay up meanwhile; a new receiver (a learner restart) continues from
`start_seqs=` (saved from `receiver.positions()`), and the producers are restarted so they ask again.

Usage:
    # learner
    receiver = GroupReceiver("tcp://0.0.0.0:5555", credits=32)
    for msg in receiver:            # RolloutGroup | RolloutError, per producer in sequence order
        ...
        receiver.announce(WeightVersion(version=3, path="/ckpt/step3"))
    # rollout worker
    sender = GroupSender("tcp://learner:5555", "worker-0")
    position = sender.handshake()   # regenerate the prompt stream from this position
    sender.send(group)              # group.seq = AUTO_SEQ (-1) or the position it was made for
    update = sender.poll_weight_version()   # or GroupSender(..., on_weights=callback)
    sender.close()

Zero-copy where pyzmq allows: messages go out with `copy=False` (pyzmq hands buffers over 64 KiB to
libzmq without a copy) and are decoded straight from the received frame's buffer.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import msgspec
import zmq

from medvl_engine.transport.messages import (
    Credit,
    Goodbye,
    Hello,
    Message,
    RolloutError,
    RolloutGroup,
    WeightVersion,
    decode,
    encode,
)

log = logging.getLogger(__name__)

AUTO_SEQ = -1  # a message's `seq` that the sender fills with the stream's next position
_MAX_WAIT_MS = 2**31 - 1  # ZMQ_RCVTIMEO is an int (ms); a longer timeout waits in several reads

StreamMessage = RolloutGroup | RolloutError


class TransportError(RuntimeError):
    """The channel cannot go on as the protocol says."""


class ProtocolError(TransportError):
    """A peer sent something the protocol does not allow (undecodable bytes, a wrong message type)."""


class SequenceGap(TransportError):
    """Messages of a producer were lost: `received` arrived while `expected` was the next number."""

    def __init__(self, producer: str, expected: int, received: int) -> None:
        self.producer, self.expected, self.received = producer, expected, received
        super().__init__(f"producer {producer!r}: expected sequence number {expected}, received {received} "
                         f"({received - expected} message(s) lost)")


def _check_timeout(timeout: float | None, where: str) -> float | None:
    if timeout is not None and not timeout >= 0:
        raise ValueError(f"{where}: timeout must be None or >= 0 seconds, got {timeout!r}")
    return None if timeout is None else time.monotonic() + timeout


def _poll_ms(deadline: float | None) -> int | None:
    return None if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))


def _decode(frame: zmq.Frame, source: str) -> Message:
    try:
        return decode(frame.buffer)
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"undecodable message ({len(frame.buffer)} bytes) from {source}: {exc}") from exc


# --------------------------------------------------------------------------------------------- sender


@dataclass
class SenderStats:
    sent: int = 0
    max_outstanding: int = 0  # most messages ever sent and not yet consumed by the receiver's application
    credit_waits: int = 0  # sends that had to wait for credit
    credit_wait_s: float = 0.0
    resumed_from: int = -1  # the position the receiver gave at the handshake
    weight_updates: int = 0


class GroupSender:
    """Producer side: numbers messages per producer and sends them within the receiver's credit.

    Not thread-safe (a ZeroMQ socket belongs to one thread): call it from the thread that owns it.
    `on_weights` is called from inside `send`/`poll_weight_version`/`handshake` when an announcement arrives.
    """

    def __init__(self, endpoint: str, producer_id: str, *, connect: bool = True,
                 on_weights: Callable[[WeightVersion], None] | None = None, weight_version: int = 0,
                 linger_s: float = 10.0, context: zmq.Context | None = None) -> None:
        if not isinstance(producer_id, str) or not producer_id:
            raise ValueError(f"GroupSender: producer_id must be a non-empty string, got {producer_id!r}")
        if linger_s < 0:
            raise ValueError(f"GroupSender {producer_id!r}: linger_s must be >= 0, got {linger_s}")
        self.producer_id = producer_id
        self.endpoint = endpoint
        self.stats = SenderStats()
        self._on_weights = on_weights
        self._linger_ms = int(linger_s * 1000)
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._next_seq = -1  # unknown until the first Credit
        self._limit = 0
        self._arrived = 0  # the receiver has every sequence number below this (the last Credit's next_seq)
        self._low_credit = 0  # below this much credit left, every send looks for a new Credit first
        self._consumed = 0  # the receiver's application has taken every sequence number below this
        self._consumer_version = 0
        self._weights: WeightVersion | None = None
        self._new_weights = False
        self._sock = self._context.socket(zmq.DEALER)
        # One routing id per process, stable across TCP reconnects, new after a restart: the receiver
        # tells a restarted producer's leftovers from its new session.
        self._sock.setsockopt(zmq.ROUTING_ID, f"{producer_id}/{os.getpid()}/{secrets.token_hex(4)}".encode())
        try:
            self._sock.connect(endpoint) if connect else self._sock.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close(linger_s=0)
            raise ValueError(f"GroupSender {producer_id!r}: cannot {'connect to' if connect else 'bind'} "
                             f"{endpoint!r}: {exc}") from exc
        # ZeroMQ queues the Hello until the connection is up, so the receiver may start later.
        self._sock.send(encode(Hello(producer=producer_id, pid=os.getpid(), weight_version=weight_version)))

    # -- public surface

    def handshake(self, timeout: float | None = None) -> int:
        """Wait for the receiver's first Credit and return the position to (re)generate from."""
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.handshake")
        while self._next_seq < 0:
            self._wait_input(deadline, timeout, "answer to its Hello")
        return self._next_seq

    @property
    def next_seq(self) -> int:
        """The sequence number the next message gets (known after the handshake)."""
        if self._next_seq < 0:
            raise TransportError(f"GroupSender {self.producer_id!r}: next_seq is unknown before handshake()")
        return self._next_seq

    @property
    def consumer_version(self) -> int:
        """The newest policy version the receiver has announced (for the pool's staleness bound)."""
        return self._consumer_version

    def send(self, msg: StreamMessage, timeout: float | None = None) -> int:
        """Send one group or error; returns its sequence number.

        `msg.seq` is `AUTO_SEQ` (stamped here) or must equal `next_seq`; `msg.producer` is empty (stamped)
        or this producer. Blocks while the producer has no credit; `TimeoutError` after `timeout` seconds,
        with nothing sent.
        """
        if not isinstance(msg, (RolloutGroup, RolloutError)):
            raise TypeError(f"GroupSender {self.producer_id!r}: can send RolloutGroup or RolloutError, "
                            f"not {type(msg).__name__}")
        if msg.producer != self.producer_id:
            if msg.producer:
                raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} belongs to "
                                 f"producer {msg.producer!r}")
            msg.producer = self.producer_id
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.send")
        if self._next_seq < 0:
            self.handshake(timeout)
        if msg.seq == AUTO_SEQ:
            msg.seq = self._next_seq
        elif msg.seq != self._next_seq:
            raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} has seq {msg.seq} but "
                             f"the stream is at {self._next_seq} (regenerate from next_seq after a restart)")
        # Look for credits and announcements when the credit runs low (below a quarter window; Credits come
        # every quarter window) or every 8th send, not on every send: each look is a syscall and a zmq.Again.
        if self._limit - self._next_seq <= self._low_credit or not self.stats.sent & 7:
            self._drain()
        if self._next_seq >= self._limit:
            started = time.perf_counter()
            self.stats.credit_waits += 1
            while self._next_seq >= self._limit:
                self._wait_input(deadline, timeout, f"credit for seq {self._next_seq} (limit {self._limit})")
            self.stats.credit_wait_s += time.perf_counter() - started
        self._sock.send(encode(msg), copy=False)
        self._next_seq += 1
        self.stats.sent += 1
        self.stats.max_outstanding = max(self.stats.max_outstanding, self._next_seq - self._consumed)
        return msg.seq

    def poll_weight_version(self, timeout: float = 0.0) -> WeightVersion | None:
        """The newest WeightVersion announced since the last call, waiting up to `timeout` seconds
        (None: forever) for one; None when there is none."""
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.poll_weight_version")
        self._drain()
        while not self._new_weights and (deadline is None or time.monotonic() < deadline):
            if self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
                self._drain()
        if not self._new_weights:
            return None
        self._new_weights = False
        return self._weights

    def close(self, linger_s: float | None = None) -> None:
        """Close the socket once the receiver has everything sent, waiting at most `linger_s` seconds
        (default: the constructor's) for it to say so; then messages still queued are dropped."""
        if self._sock.closed:
            return
        linger = self._linger_ms / 1000 if linger_s is None else linger_s
        deadline = time.monotonic() + linger
        if self._arrived < self._next_seq and linger > 0:
            self._drain()  # the Credits already here may say it all arrived
        if self._arrived < self._next_seq and linger > 0:
            self._sock.send(encode(Goodbye(producer=self.producer_id)))
            while self._arrived < self._next_seq and time.monotonic() < deadline:
                if self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
                    self._drain()
        self._sock.close(linger=max(0, int((deadline - time.monotonic()) * 1000)))
        if self._own_context:
            self._context.term()

    def __enter__(self) -> GroupSender:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- incoming: credits and weight announcements

    def _wait_input(self, deadline: float | None, timeout: float | None, what: str) -> None:
        if not self._sock.poll(_poll_ms(deadline), zmq.POLLIN):
            raise TimeoutError(f"GroupSender {self.producer_id!r}: no {what} from {self.endpoint} "
                               f"within {timeout} s")
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            msg = _decode(frame, f"the receiver at {self.endpoint}")
            if isinstance(msg, Credit):
                self._credit(msg)
            elif isinstance(msg, WeightVersion):
                self._weight_version(msg)
            else:
                raise ProtocolError(f"GroupSender {self.producer_id!r}: unexpected {type(msg).__name__} "
                                    f"from the receiver at {self.endpoint}")

    def _credit(self, credit: Credit) -> None:
        if credit.producer != self.producer_id:
            raise ProtocolError(f"GroupSender {self.producer_id!r}: received credit meant for {credit.producer!r}")
        if self._next_seq < 0:
            self._next_seq = credit.next_seq
            self._consumed = credit.next_seq
            self.stats.resumed_from = credit.next_seq
        # A restarted producer's new session may be told `next_seq` beyond its own position when the
        # dead process's last messages arrive after the Hello: those positions will come as duplicates.
        self._limit = max(self._limit, credit.next_seq + credit.credits)
        self._arrived = max(self._arrived, credit.next_seq)
        self._low_credit = credit.window // 4
        self._consumed = max(self._consumed, credit.next_seq + credit.credits - credit.window)
        self._consumer_version = max(self._consumer_version, credit.consumer_version)

    def _weight_version(self, update: WeightVersion) -> None:
        if self._weights is not None and update.version < self._weights.version:
            return
        self._weights = update
        self._new_weights = True
        self._consumer_version = max(self._consumer_version, update.version)
        self.stats.weight_updates += 1
        if self._on_weights is not None:
            self._on_weights(update)


# ------------------------------------------------------------------------------------------- receiver


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
    route: bytes = field(default=b"", repr=False)


@dataclass
class ReceiverStats:
    received: int = 0  # accepted messages
    delivered: int = 0
    duplicates: int = 0
    lost: int = 0
    producers: dict[str, ProducerStats] = field(default_factory=dict)


class GroupReceiver:
    """Consumer side: an iterator of RolloutGroup / RolloutError, per producer in sequence order.

    `credits` is the grant per producer: how many of its messages may be in transit or waiting here
    unconsumed. A message counts as consumed when `recv` hands it out. Not thread-safe.
    """

    def __init__(self, endpoint: str, *, credits: int = 32, bind: bool = True,
                 start_seqs: Mapping[str, int] | None = None, on_gap: str = "raise",
                 context: zmq.Context | None = None) -> None:
        if not isinstance(credits, int) or credits < 1:
            raise ValueError(f"GroupReceiver: credits must be a positive int, got {credits!r}")
        if on_gap not in ("raise", "count"):
            raise ValueError(f"GroupReceiver: on_gap must be 'raise' or 'count', got {on_gap!r}")
        for name, seq in (start_seqs or {}).items():
            if not isinstance(seq, int) or seq < 0:
                raise ValueError(f"GroupReceiver: start_seqs[{name!r}] must be an int >= 0, got {seq!r}")
        self._credits = credits
        # Acks go out every quarter window: one Credit per 8 groups at the default 32, and the producer
        # still has 3/4 of its window to keep sending while the Credit travels.
        self._ack_every = max(1, credits // 4)
        self._start_seqs = dict(start_seqs or {})
        self._on_gap = on_gap
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._sock = self._context.socket(zmq.ROUTER)
        # A producer reconnecting with its routing id takes its route over instead of being refused.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        try:
            self._sock.bind(endpoint) if bind else self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ValueError(f"GroupReceiver: cannot {'bind' if bind else 'connect to'} {endpoint!r}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._producers: dict[str, ProducerStats] = {}
        self._routes: dict[bytes, ProducerStats] = {}  # every session ever seen, dead ones included
        self._ready: deque[StreamMessage | SequenceGap] = deque()
        self._unacked: set[str] = set()
        self._weights: WeightVersion | None = None
        self._received = 0
        self._delivered = 0
        self._rcvtimeo = -1  # the socket's current RCVTIMEO (ms), set only when a wait needs another

    # -- public surface

    def recv(self, timeout: float | None = None) -> StreamMessage:
        """The next message; `TimeoutError` when none arrives within `timeout` seconds."""
        if not self._ready:
            self._wait(timeout)
        msg = self._ready.popleft()
        if isinstance(msg, SequenceGap):
            raise msg
        state = self._producers[msg.producer]
        state.buffered -= 1
        state.consumed = msg.seq + 1
        state.pending_acks += 1
        self._delivered += 1
        if state.pending_acks >= self._ack_every:
            self._send_credit(state)
        else:
            self._unacked.add(state.producer)
        return msg

    def __iter__(self) -> Iterator[StreamMessage]:
        while True:
            yield self.recv()

    def announce(self, update: WeightVersion) -> None:
        """Tell every producer (and every later one, at its Hello) that policy `update.version` is ready."""
        if not isinstance(update, WeightVersion):
            raise TypeError(f"GroupReceiver.announce takes a WeightVersion, not {type(update).__name__}")
        if self._weights is not None and update.version < self._weights.version:
            raise ValueError(f"GroupReceiver.announce: version {update.version} is older than the announced "
                             f"{self._weights.version}")
        self._weights = update
        payload = encode(update)
        for state in self._producers.values():
            if state.route:
                self._sock.send_multipart([state.route, payload])

    def positions(self) -> dict[str, int]:
        """Per producer, the first sequence number not yet handed out: save it with a learner checkpoint
        and give it back as `start_seqs=` to a new receiver."""
        return {name: state.consumed for name, state in self._producers.items()}

    @property
    def stats(self) -> ReceiverStats:
        producers = {name: ProducerStats(**{**vars(s), "route": b""}) for name, s in self._producers.items()}
        return ReceiverStats(received=self._received, delivered=self._delivered,
                             duplicates=sum(s.duplicates for s in producers.values()),
                             lost=sum(s.lost for s in producers.values()), producers=producers)

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(linger=0)  # pending credits to producers are worthless once we are gone
        if self._own_context:
            self._context.term()

    def __enter__(self) -> GroupReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- incoming

    def _wait(self, timeout: float | None) -> None:
        """Take messages off the socket until one is ready to hand out: all that are queued, or else the
        first to arrive (a blocking read under RCVTIMEO: one call where poll + read would be two)."""
        deadline = _check_timeout(timeout, "GroupReceiver.recv")
        while not self._ready:
            # Before every read, not only before sleeping: a producer at its limit would otherwise wait for
            # as long as other producers keep the socket busy, and forever once nothing else arrives.
            self._flush_acks()
            if self._drain():
                continue
            wait_ms = -1 if deadline is None else min(_MAX_WAIT_MS, max(0, math.ceil(
                (deadline - time.monotonic()) * 1000)))
            if wait_ms != self._rcvtimeo:
                self._sock.setsockopt(zmq.RCVTIMEO, wait_ms)
                self._rcvtimeo = wait_ms
            try:
                route = self._sock.recv()
            except zmq.Again:
                if deadline is not None and time.monotonic() < deadline:
                    continue
                raise TimeoutError(f"GroupReceiver on {self.endpoint}: nothing arrived within {timeout} s") from None
            self._take(route)
            self._drain()

    def _drain(self) -> int:
        """Take every message already queued; how many there were."""
        taken = 0
        while True:
            try:
                route = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return taken
            self._take(route)
            taken += 1

    def _take(self, route: bytes) -> None:
        # The rest of a multipart message is queued with its first frame, so this read never waits.
        frame = self._sock.recv(copy=False)
        if frame.more:
            extra = 1
            while self._sock.getsockopt(zmq.RCVMORE):
                self._sock.recv(copy=False)
                extra += 1
            raise ProtocolError(f"GroupReceiver on {self.endpoint}: message of {1 + extra} frames from "
                                f"{self._source(route)}, expected 1")
        self._dispatch(route, frame)

    def _dispatch(self, route: bytes, frame: zmq.Frame) -> None:
        try:
            msg = decode(frame.buffer)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"undecodable message ({len(frame.buffer)} bytes) from {self._source(route)}: "
                                f"{exc}") from exc
        if isinstance(msg, (RolloutGroup, RolloutError)):
            self._accept(route, msg)
        elif isinstance(msg, Hello):
            self._hello(route, msg)
        elif isinstance(msg, Goodbye):
            self._goodbye(route, msg)
        else:
            raise ProtocolError(f"GroupReceiver on {self.endpoint}: unexpected {type(msg).__name__} from "
                                f"{self._source(route)}")

    def _source(self, route: bytes) -> str:
        return f"session {route.decode(errors='replace')!r}"

    def _producer(self, name: str) -> ProducerStats:
        state = self._producers.get(name)
        if state is None:
            start = self._start_seqs.get(name, 0)
            state = self._producers[name] = ProducerStats(producer=name, next_seq=start, consumed=start)
        return state

    def _hello(self, route: bytes, hello: Hello) -> None:
        state = self._producer(hello.producer)
        if route not in self._routes:
            state.sessions += 1
            self._routes[route] = state
            if state.sessions > 1:
                log.info("producer %r restarted (pid %d): resumes at %d", hello.producer, hello.pid, state.next_seq)
        elif self._routes[route] is not state:
            raise ProtocolError(f"GroupReceiver: {self._source(route)} said Hello as {hello.producer!r} after "
                                f"sending as {self._routes[route].producer!r}")
        state.route = route
        self._send_credit(state)
        if self._weights is not None:
            self._sock.send_multipart([route, encode(self._weights)])

    def _goodbye(self, route: bytes, goodbye: Goodbye) -> None:
        state = self._routes.get(route)
        if state is None:
            # A session we never heard from: what it sent went to a receiver before us, which we cannot vouch for.
            log.warning("Goodbye from %s (producer %r), which sent nothing here", self._source(route), goodbye.producer)
            return
        if state.producer != goodbye.producer:
            raise ProtocolError(f"GroupReceiver: {self._source(route)} of producer {state.producer!r} said Goodbye "
                                f"as {goodbye.producer!r}")
        # Sent on the closing session's route (not state.route, which a restarted process may own by now).
        credit = Credit(producer=state.producer, credits=max(0, state.granted - state.next_seq),
                        next_seq=state.next_seq, window=self._credits,
                        consumer_version=0 if self._weights is None else self._weights.version)
        self._sock.send(route, zmq.SNDMORE)
        self._sock.send(encode(credit))

    def _accept(self, route: bytes, msg: StreamMessage) -> None:
        state = self._routes.get(route)
        if state is None:
            # A session we never heard Hello from: its producer was talking to a receiver before us.
            state = self._routes[route] = self._producer(msg.producer)
            state.route = state.route or route
        elif state.producer != msg.producer:
            raise ProtocolError(f"GroupReceiver: {self._source(route)} of producer {state.producer!r} sent "
                                f"message {msg.prompt_id!r} as producer {msg.producer!r}")
        if msg.seq < state.next_seq:
            state.duplicates += 1
            return
        gap = msg.seq - state.next_seq
        state.lost += gap
        state.next_seq = msg.seq + 1
        state.buffered += 1
        state.max_buffered = max(state.max_buffered, state.buffered)
        self._received += 1
        if gap:
            log.warning("producer %r: %d message(s) lost before seq %d", msg.producer, gap, msg.seq)
            if self._on_gap == "raise":
                # raised by recv in stream order, after the messages before the gap were handed out
                self._ready.append(SequenceGap(msg.producer, msg.seq - gap, msg.seq))
        self._ready.append(msg)

    # -- outgoing credit

    def _send_credit(self, state: ProducerStats) -> None:
        state.pending_acks = 0
        self._unacked.discard(state.producer)
        if not state.route:
            return
        limit = state.consumed + self._credits
        state.granted = limit
        credit = Credit(producer=state.producer, credits=max(0, limit - state.next_seq), next_seq=state.next_seq,
                        consumer_version=0 if self._weights is None else self._weights.version,
                        window=self._credits)
        self._sock.send(state.route, zmq.SNDMORE)
        self._sock.send(encode(credit))

    def _flush_acks(self) -> None:
        # Only producers that have used up their credit wait for it; the others still have messages on
        # the way that will be consumed and acked. Each Credit wakes libzmq's I/O threads on both sides,
        # and on 2 busy cores an ack per wait cost ~40% of the throughput.
        for name in list(self._unacked):
            state = self._producers[name]
            if state.next_seq >= state.granted:
                self._send_credit(state)
