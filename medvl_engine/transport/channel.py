"""The ZeroMQ channel of scored rollout groups: `GroupSender` (rollout worker) -> `GroupReceiver` (learner).

Socket pattern: the receiver is a ROUTER, each sender a DEALER. The channel is two-way per producer
(groups flow to the learner; credits and weight announcements flow back, to one producer or to all),
and ROUTER/DEALER is the ZeroMQ pattern that gives every peer an address on one asynchronous
bidirectional connection. REQ/REP would allow one group per round trip (~130 us, far below the link's
~25k messages/s); PUSH/PULL is one-way and would need a second socket pair matched by hand; PUB/SUB
drops messages at its high-water mark. Either side may bind (`bind=` / `connect=`): `ipc://` on one
node, `tcp://` across nodes.

Protocol (messages in `medvl_engine.transport.messages`):
1. The sender connects and sends `Hello(producer, pid)`. The Hello binds the connection's routing id (128
   random bits per process, chosen by the sender) to the producer: from then on every frame of that
   connection is that producer's, and a frame whose body names another producer is dropped. Nothing is
   accepted from a connection before its Hello.
2. The receiver answers `Credit(producer, credits, next_seq, consumer_version, window, max_message_bytes)`:
   `next_seq` is the first sequence number of this producer it has not received, and the producer may send
   sequence numbers below `next_seq + credits`; then the latest `WeightVersion`, if one was announced.
3. The sender numbers its messages 0, 1, 2, ... per producer (`RolloutGroup` and `RolloutError` alike)
   and never goes past its limit, so at most `window` (the receiver's `credits=`) of its messages are in
   transit or waiting unconsumed in the receiver: a slow learner bounds the workers' memory.
4. The receiver grants credit as its application consumes messages: every `credits // 4` messages
   per producer, and, before it reads the socket, to every producer that has used up its credit. The
   sender looks for Credits when its credit runs under a quarter window (and every 8th send). Each
   Credit restates the whole limit, so a repeated Credit does no harm.
5. A closing sender sends `Goodbye`, and the receiver answers with a Credit whose `next_seq` says how
   much of the stream arrived; the sender closes once it is all there (or `linger_s` has passed).

Admission: the receiver outlives any peer. A frame that is not one message (`multipart`), not msgpack
(`undecodable`), not a message of ours or of impossible shape (`invalid`), a Credit or WeightVersion
(`unexpected_type`), from a connection that never said Hello (`no_hello`), naming another producer than its
connection's (`wrong_producer`), at or past the producer's credit limit (`over_credit`), or a Hello of a new
producer past `max_producers` (`too_many_producers`) is dropped, counted in `stats.dropped[reason]` and
logged with the peer (the 1st, 10th, 100th ... of each reason), and the stream goes on. A message over
`max_message_bytes` never reaches the channel: libzmq (ZMQ_MAXMSGSIZE) cuts the connection that sent it
(a DEALER reconnects) without telling why, so those are not counted; a GroupSender refuses to send one.

Memory: a producer's messages are accepted only below its credit limit, so at most `credits` of them wait
here unconsumed; libzmq reads at most `credits + 16` more from one connection (RCVHWM) before it stops
reading it (TCP then throttles the sender). Each message is at most `max_message_bytes`, and there are at
most `max_producers` producers (and `_MAX_SESSIONS` remembered connections each).

Security: an `ipc://` socket file is created owner-only (0600): only this user's processes connect. A
`tcp://` endpoint other hosts can reach uses ZeroMQ CURVE (`medvl_engine.transport.keys`): the connection
is encrypted and only peers that hold the run's keys finish the handshake, so a stranger's frame never
arrives. Loopback tcp is unauthenticated unless given keys. A peer that can connect and says Hello under a
live producer's name is taken for that producer's restart (below): the keys and the socket's permissions
are what keep strangers out; admission bounds what an authenticated peer's mistakes can cost.

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
    # learner (keys from `medvl-engine keys DIR`, the same folder on every node)
    receiver = GroupReceiver("tcp://0.0.0.0:5555", credits=32, keys="DIR")
    for msg in receiver:            # RolloutGroup | RolloutError, per producer in sequence order
        ...
        receiver.announce(WeightVersion(version=3, path="/ckpt/step3"))
    # rollout worker
    sender = GroupSender("tcp://learner:5555", "worker-0", keys="DIR")
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
from zmq.utils.monitor import recv_monitor_message

from medvl_engine.profiling import stage
from medvl_engine.transport.keys import KEYS_HINT, curve_folder, load_client_keys, load_server_keys
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
    shape_error,
)

log = logging.getLogger(__name__)

AUTO_SEQ = -1  # a message's `seq` that the sender fills with the stream's next position
MAX_MESSAGE_BYTES = 256 << 20  # default receiver limit: a group of 8 answers of 4k tokens is ~0.3 MB
MAX_PRODUCERS = 1024
_MAX_SESSIONS = 8  # connections remembered per producer: a dead process's last messages are still accepted
_MAX_NAME = 256  # characters of a producer name
_CONTROL_SLACK = 16  # RCVHWM above the credit: a Hello and a Goodbye per connection, with room for repeats
_MAX_CONTROL_BYTES = 1 << 20  # what a sender reads: Credits and WeightVersions, a few hundred bytes each
_DRAIN_BATCH = 256  # frames read per pass, so a flood cannot keep recv from returning what is ready
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


def _open(sock: zmq.Socket, endpoint: str, bind: bool) -> None:
    """Connect, or bind; an ipc socket file is owner-only from the moment it exists."""
    if not bind:
        sock.connect(endpoint)
        return
    if not endpoint.startswith("ipc://"):
        sock.bind(endpoint)
        return
    if endpoint.startswith("ipc://@"):
        raise ValueError("an abstract ipc socket (ipc://@name) has no file permissions: any local user could "
                         "connect; bind a path (ipc:///run/user/UID/medvl.sock)")
    # libzmq creates the file inside zmq_bind, in this thread: under umask 077 it is born 0600, where a chmod
    # after the bind would leave a moment in which any local user could connect. The umask is the process's,
    # restored at once; a file another thread creates meanwhile is at worst owner-only.
    umask = os.umask(0o077)
    try:
        sock.bind(endpoint)
    finally:
        os.umask(umask)
    os.chmod(sock.getsockopt_string(zmq.LAST_ENDPOINT)[len("ipc://"):], 0o600)


# --------------------------------------------------------------------------------------------- sender


@dataclass
class SenderStats:
    sent: int = 0
    max_outstanding: int = 0  # most messages ever sent and not yet consumed by the receiver's application
    credit_waits: int = 0  # sends that had to wait for credit
    credit_wait_s: float = 0.0
    resumed_from: int = -1  # the position the receiver gave at the handshake
    weight_updates: int = 0


# Handshake failures the sender watches for until its first Credit, to say why a connection never came up.
_HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class GroupSender:
    """Producer side: numbers messages per producer and sends them within the receiver's credit.

    Not thread-safe (a ZeroMQ socket belongs to one thread): call it from the thread that owns it.
    `on_weights` is called from inside `send`/`poll_weight_version`/`handshake` when an announcement arrives.
    `keys` is a folder from `medvl-engine keys` (default: $MEDVL_TRANSPORT_KEYS); CURVE is used as
    `medvl_engine.transport.keys.use_curve` says (`curve=True/False` forces it).
    """

    def __init__(self, endpoint: str, producer_id: str, *, connect: bool = True,
                 on_weights: Callable[[WeightVersion], None] | None = None, weight_version: int = 0,
                 linger_s: float = 10.0, keys: str | os.PathLike | None = None, curve: bool | None = None,
                 context: zmq.Context | None = None) -> None:
        if not isinstance(producer_id, str) or not producer_id or len(producer_id) > _MAX_NAME:
            raise ValueError(f"GroupSender: producer_id must be a non-empty string of at most {_MAX_NAME} "
                             f"characters, got {producer_id!r}")
        if linger_s < 0:
            raise ValueError(f"GroupSender {producer_id!r}: linger_s must be >= 0, got {linger_s}")
        who = f"GroupSender {producer_id!r}"
        folder = curve_folder(endpoint, keys, curve, who)
        client_keys = None if folder is None else load_client_keys(folder, who)
        self.producer_id = producer_id
        self.endpoint = endpoint
        self.stats = SenderStats()
        self._on_weights = on_weights
        self._linger_ms = int(linger_s * 1000)
        self._curve = client_keys is not None
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._next_seq = -1  # unknown until the first Credit
        self._limit = 0
        self._arrived = 0  # the receiver has every sequence number below this (the last Credit's next_seq)
        self._low_credit = 0  # below this much credit left, every send looks for a new Credit first
        self._consumed = 0  # the receiver's application has taken every sequence number below this
        self._max_message_bytes = 0  # the receiver's limit, from its Credits (0: not said)
        self._consumer_version = 0
        self._weights: WeightVersion | None = None
        self._new_weights = False
        self._handshake_trouble = ""
        self._sock = self._context.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.MAXMSGSIZE, _MAX_CONTROL_BYTES)
        # One routing id per process, stable across TCP reconnects, new after a restart: the receiver tells a
        # restarted producer's leftovers from its new session. 128 random bits: the receiver hands a routing
        # id over to whoever connects with it (ROUTER_HANDOVER), so it must not be guessable.
        self._sock.setsockopt(zmq.ROUTING_ID, f"{producer_id}/{os.getpid()}/{secrets.token_hex(16)}".encode())
        if client_keys is not None:
            self._sock.curve_serverkey = client_keys.server_public
            self._sock.curve_publickey = client_keys.public
            self._sock.curve_secretkey = client_keys.secret
        self._monitor: zmq.Socket | None = self._sock.get_monitor_socket(_HANDSHAKE_FAILURES)
        try:
            _open(self._sock, endpoint, bind=not connect)
        except (zmq.ZMQError, ValueError, OSError) as exc:
            self.close(linger_s=0)
            raise ValueError(f"{who}: cannot {'connect to' if connect else 'bind'} {endpoint!r}: {exc}") from exc
        # ZeroMQ queues the Hello until the connection is up, so the receiver may start later.
        self._sock.send(encode(Hello(producer=producer_id, pid=os.getpid(), weight_version=weight_version)))

    # -- public surface

    def handshake(self, timeout: float | None = None) -> int:
        """Wait for the receiver's first Credit and return the position to (re)generate from.

        `TransportError` at once when the receiver refuses the connection (CURVE on one end only, a key it
        does not accept); `TimeoutError` when nothing answers within `timeout` seconds."""
        deadline = _check_timeout(timeout, f"GroupSender {self.producer_id!r}.handshake")
        if self._monitor is not None and self._next_seq < 0:
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            while self._next_seq < 0:
                ready = dict(poller.poll(_poll_ms(deadline)))
                if not ready:
                    raise TimeoutError(f"GroupSender {self.producer_id!r}: no answer to its Hello from "
                                       f"{self.endpoint} within {timeout} s{self._handshake_trouble}")
                if self._monitor in ready:
                    self._handshake_events()
                if self._sock in ready:
                    self._drain()
        while self._next_seq < 0:
            self._wait_input(deadline, timeout, "answer to its Hello")
        self._stop_monitor()
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
        with nothing sent. `ValueError`, with nothing sent, for a message larger than the receiver reads.
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
        if msg.seq != AUTO_SEQ and msg.seq != self._next_seq:
            raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} has seq {msg.seq} but "
                             f"the stream is at {self._next_seq} (regenerate from next_seq after a restart)")
        auto = msg.seq == AUTO_SEQ
        msg.seq = self._next_seq
        with stage("send"):  # encoding, waiting for credit, handing the frame to libzmq
            payload = encode(msg)
            if self._max_message_bytes and len(payload) > self._max_message_bytes:
                if auto:
                    msg.seq = AUTO_SEQ
                raise ValueError(f"GroupSender {self.producer_id!r}: message {msg.prompt_id!r} is {len(payload)} "
                                 f"bytes, over the {self._max_message_bytes} bytes the receiver at {self.endpoint} "
                                 "reads")
            # Look for credits and announcements when the credit runs low (below a quarter window; Credits come
            # every quarter window) or every 8th send, not on every send: each look is a syscall and a zmq.Again.
            if self._limit - self._next_seq <= self._low_credit or not self.stats.sent & 7:
                self._drain()
            if self._next_seq >= self._limit:
                started = time.perf_counter()
                self.stats.credit_waits += 1
                while self._next_seq >= self._limit:
                    try:
                        self._wait_input(deadline, timeout, f"credit for seq {self._next_seq} (limit {self._limit})")
                    except TimeoutError:
                        if auto:
                            msg.seq = AUTO_SEQ
                        raise
                self.stats.credit_wait_s += time.perf_counter() - started
            self._sock.send(payload, copy=False)
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
        self._stop_monitor()
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

    # -- connection trouble, until the first Credit

    def _handshake_events(self) -> None:
        while self._monitor is not None and self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)
            kind, value = event["event"], event["value"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise TransportError(f"GroupSender {self.producer_id!r}: the receiver at {self.endpoint} refused "
                                     f"this producer's CURVE key (ZAP status {value}): client.key_secret is not "
                                     f"from the receiver's key folder")
            if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    mine = "uses CURVE keys and the receiver does not" if self._curve else \
                        "has no CURVE keys and the receiver asks for them"
                    raise TransportError(f"GroupSender {self.producer_id!r}: {self.endpoint}: this sender {mine}; "
                                         f"give both ends the same key folder ({KEYS_HINT})")
                raise TransportError(f"GroupSender {self.producer_id!r}: handshake with {self.endpoint} failed "
                                     f"(ZeroMQ protocol error {value:#x})")
            # No detail: a CURVE handshake that cannot be decrypted (a server.key that is not the receiver's),
            # or a connection reset mid-handshake; libzmq retries, and a timeout says it happened.
            self._handshake_trouble = (" (handshakes failed: is server.key the receiver's?)" if self._curve
                                       else " (handshakes failed)")

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._sock.disable_monitor()
            self._monitor.close(linger=0)
            self._monitor = None

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
        self._max_message_bytes = credit.max_message_bytes

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
    dropped: dict[str, int] = field(default_factory=dict)  # frames refused, per reason (see the module docstring)


class _ClientKeyCheck:
    """The ZAP callback of a CURVE receiver (called in pyzmq's authenticator thread): only connections that
    hold the producers' key pair get in."""

    def __init__(self, client_public: bytes, endpoint: str) -> None:
        self.client_public = client_public
        self.endpoint = endpoint
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key == self.client_public:
            return True
        self.refused += 1
        if _is_log_count(self.refused):
            log.warning("GroupReceiver on %s: refused a CURVE handshake with unknown client key %s (%d so far)",
                        self.endpoint, key.decode(errors="replace"), self.refused)
        return False


def _is_log_count(count: int) -> bool:
    """1, 10, 100, ...: a flood of bad frames is logged a handful of times, not once per frame."""
    return str(count).rstrip("0") == "1"


class GroupReceiver:
    """Consumer side: an iterator of RolloutGroup / RolloutError, per producer in sequence order.

    `credits` is the grant per producer: how many of its messages may be in transit or waiting here
    unconsumed. A message counts as consumed when `recv` hands it out. `max_producers` caps the producer
    names it keeps, `max_message_bytes` the size of a message (ZMQ_MAXMSGSIZE). `keys` is a folder from
    `medvl-engine keys` (default: $MEDVL_TRANSPORT_KEYS); CURVE is used as
    `medvl_engine.transport.keys.use_curve` says (`curve=True/False` forces it). Not thread-safe.
    """

    def __init__(self, endpoint: str, *, credits: int = 32, bind: bool = True,
                 start_seqs: Mapping[str, int] | None = None, on_gap: str = "raise",
                 max_producers: int = MAX_PRODUCERS, max_message_bytes: int = MAX_MESSAGE_BYTES,
                 keys: str | os.PathLike | None = None, curve: bool | None = None,
                 context: zmq.Context | None = None) -> None:
        if not isinstance(credits, int) or credits < 1:
            raise ValueError(f"GroupReceiver: credits must be a positive int, got {credits!r}")
        if on_gap not in ("raise", "count"):
            raise ValueError(f"GroupReceiver: on_gap must be 'raise' or 'count', got {on_gap!r}")
        for name, value in (("max_producers", max_producers), ("max_message_bytes", max_message_bytes)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GroupReceiver: {name} must be a positive int, got {value!r}")
        for name, seq in (start_seqs or {}).items():
            if not isinstance(seq, int) or seq < 0:
                raise ValueError(f"GroupReceiver: start_seqs[{name!r}] must be an int >= 0, got {seq!r}")
        folder = curve_folder(endpoint, keys, curve, "GroupReceiver")
        server_keys = None if folder is None else load_server_keys(folder, "GroupReceiver")
        self._credits = credits
        # Acks go out every quarter window: one Credit per 8 groups at the default 32, and the producer
        # still has 3/4 of its window to keep sending while the Credit travels.
        self._ack_every = max(1, credits // 4)
        self._start_seqs = dict(start_seqs or {})
        self._on_gap = on_gap
        self._max_producers = max_producers
        self._max_message_bytes = max_message_bytes
        self._own_context = context is None
        self._context = zmq.Context() if context is None else context
        self._auth = None
        self._key_check: _ClientKeyCheck | None = None
        self._sock = self._context.socket(zmq.ROUTER)
        # A producer reconnecting with its routing id takes its route over instead of being refused.
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # A producer never has more than `credits` messages out; past that libzmq stops reading a connection
        # until we have read what it queued, so a flood waits in the sender's kernel, not in our memory.
        self._sock.setsockopt(zmq.RCVHWM, credits + _CONTROL_SLACK)
        self.endpoint = endpoint
        try:
            if server_keys is not None:
                self._start_authenticator(server_keys, endpoint)
            _open(self._sock, endpoint, bind)
        except (zmq.ZMQError, ValueError, OSError) as exc:
            self.close()
            raise ValueError(f"GroupReceiver: cannot {'bind' if bind else 'connect to'} {endpoint!r}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        if self._key_check is not None:
            self._key_check.endpoint = self.endpoint
        self._producers: dict[str, ProducerStats] = {}
        self._routes: dict[bytes, ProducerStats] = {}  # the last _MAX_SESSIONS sessions of every producer
        self._sessions: dict[str, deque[bytes]] = {}
        self._ready: deque[StreamMessage | SequenceGap] = deque()
        self._unacked: set[str] = set()
        self._weights: WeightVersion | None = None
        self._received = 0
        self._delivered = 0
        self._dropped: dict[str, int] = {}
        self._rcvtimeo = -1  # the socket's current RCVTIMEO (ms), set only when a wait needs another

    # -- public surface

    def recv(self, timeout: float | None = None) -> StreamMessage:
        """The next message; `TimeoutError` when none arrives within `timeout` seconds."""
        if not self._ready:
            with stage("receive"):  # waiting for the socket, decoding and admitting what arrived
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
        dropped = dict(self._dropped)
        if self._key_check is not None and self._key_check.refused:
            dropped["unknown_key"] = self._key_check.refused
        return ReceiverStats(received=self._received, delivered=self._delivered,
                             duplicates=sum(s.duplicates for s in producers.values()),
                             lost=sum(s.lost for s in producers.values()), producers=producers, dropped=dropped)

    def close(self) -> None:
        if self._sock.closed:
            return
        self._sock.close(linger=0)  # pending credits to producers are worthless once we are gone
        if self._auth is not None:
            self._auth.stop()
        if self._own_context:
            self._context.term()

    def __enter__(self) -> GroupReceiver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- CURVE

    def _start_authenticator(self, server_keys, endpoint: str) -> None:
        """CURVE server with ZAP: libzmq asks pyzmq's authenticator thread about every new connection, and
        only the producers' public key passes (without a ZAP handler CURVE would let any key in)."""
        from zmq.auth.thread import ThreadAuthenticator

        self._auth = ThreadAuthenticator(self._context)
        self._auth.start()
        self._key_check = _ClientKeyCheck(server_keys.client_public, endpoint)
        self._auth.configure_curve_callback(domain="*", credentials_provider=self._key_check)
        self._sock.curve_server = True
        self._sock.curve_secretkey = server_keys.secret
        self._sock.curve_publickey = server_keys.public

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
                if not self._ready and deadline is not None and time.monotonic() >= deadline:
                    break  # a steady stream of dropped frames must not hold recv past its timeout
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
                break
            self._take(route)
            self._drain()
        if not self._ready:
            raise TimeoutError(f"GroupReceiver on {self.endpoint}: nothing arrived within {timeout} s")

    def _drain(self) -> int:
        """Take the messages already queued, at most _DRAIN_BATCH; how many there were."""
        for taken in range(_DRAIN_BATCH):
            try:
                route = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return taken
            self._take(route)
        return _DRAIN_BATCH

    def _take(self, route: bytes) -> None:
        # The rest of a multipart message is queued with its first frame, so this read never waits.
        frame = self._sock.recv(copy=False)
        if frame.more:
            extra = 1
            while self._sock.getsockopt(zmq.RCVMORE):
                self._sock.recv(copy=False)
                extra += 1
            self._drop(route, frame, "multipart", f"a message of {1 + extra} frames, expected 1")
            return
        try:
            msg = decode(frame.buffer)
        except msgspec.ValidationError as exc:  # msgpack, but not a message of ours (a wrong tag, a wrong type)
            self._drop(route, frame, "invalid", f"{len(frame.buffer)} bytes: {exc}")
            return
        except msgspec.DecodeError as exc:
            self._drop(route, frame, "undecodable", f"{len(frame.buffer)} bytes: {exc}")
            return
        if isinstance(msg, (RolloutGroup, RolloutError)):
            self._accept(route, frame, msg)
        elif isinstance(msg, Hello):
            self._hello(route, frame, msg)
        elif isinstance(msg, Goodbye):
            self._goodbye(route, frame, msg)
        else:
            self._drop(route, frame, "unexpected_type", f"a {type(msg).__name__}, which only the receiver sends")

    def _drop(self, route: bytes, frame: zmq.Frame | None, reason: str, detail: str) -> None:
        count = self._dropped[reason] = self._dropped.get(reason, 0) + 1
        if _is_log_count(count):
            log.warning("GroupReceiver on %s: dropped a frame from %s: %s (%s; %d so far)", self.endpoint,
                        self._peer(route, frame), detail, reason, count)

    def _peer(self, route: bytes, frame: zmq.Frame | None = None) -> str:
        """A connection as a log line names it: its routing id and, where libzmq knows it, its address."""
        address = ""
        if frame is not None:
            try:
                address = frame.get("Peer-Address")
            except zmq.ZMQError:
                pass
        name = route[:80].decode(errors="replace")
        return f"connection {name!r}" + (f" at {address}" if address else "")

    def _hello(self, route: bytes, frame: zmq.Frame, hello: Hello) -> None:
        if not hello.producer or len(hello.producer) > _MAX_NAME:
            self._drop(route, frame, "invalid", f"a Hello with producer name {hello.producer[:_MAX_NAME]!r}")
            return
        state = self._routes.get(route)
        if state is not None and state.producer != hello.producer:
            self._drop(route, frame, "wrong_producer", f"a Hello as {hello.producer!r} on the connection of "
                                                       f"producer {state.producer!r}")
            return
        if state is None:
            state = self._producers.get(hello.producer)
            if state is None:
                if len(self._producers) >= self._max_producers:
                    self._drop(route, frame, "too_many_producers", f"a Hello of producer {hello.producer!r} past "
                                                                   f"the {self._max_producers} producers allowed")
                    return
                start = self._start_seqs.get(hello.producer, 0)
                state = self._producers[hello.producer] = ProducerStats(producer=hello.producer, next_seq=start,
                                                                        consumed=start)
            state.sessions += 1
            self._routes[route] = state
            sessions = self._sessions.setdefault(state.producer, deque())
            sessions.append(route)
            if len(sessions) > _MAX_SESSIONS:
                self._routes.pop(sessions.popleft(), None)
            if state.sessions > 1:
                log.info("producer %r restarted (pid %d, %s): resumes at %d", hello.producer, hello.pid,
                         self._peer(route, frame), state.next_seq)
        state.route = route
        self._send_credit(state)
        if self._weights is not None:
            self._sock.send_multipart([route, encode(self._weights)])

    def _goodbye(self, route: bytes, frame: zmq.Frame, goodbye: Goodbye) -> None:
        state = self._routes.get(route)
        if state is None:
            # Its producer was talking to a receiver before us (or is no producer): we cannot vouch for what it sent.
            self._drop(route, frame, "no_hello", f"a Goodbye as {goodbye.producer!r} before any Hello")
            return
        if state.producer != goodbye.producer:
            self._drop(route, frame, "wrong_producer", f"a Goodbye as {goodbye.producer!r} on the connection of "
                                                       f"producer {state.producer!r}")
            return
        # Sent on the closing session's route (not state.route, which a restarted process may own by now).
        self._sock.send_multipart([route, encode(self._credit(state, limit=state.granted))])

    def _accept(self, route: bytes, frame: zmq.Frame, msg: StreamMessage) -> None:
        state = self._routes.get(route)
        if state is None:
            # A session we never heard Hello from (or one of a producer's sessions so old it was forgotten):
            # the name and sequence number in its body are only claims.
            self._drop(route, frame, "no_hello", f"{type(msg).__name__} {msg.prompt_id[:80]!r} as producer "
                                                 f"{msg.producer[:_MAX_NAME]!r} seq {msg.seq} before any Hello")
            return
        if state.producer != msg.producer:
            self._drop(route, frame, "wrong_producer", f"{type(msg).__name__} {msg.prompt_id[:80]!r} as producer "
                                                       f"{msg.producer[:_MAX_NAME]!r} on the connection of producer "
                                                       f"{state.producer!r}")
            return
        problem = shape_error(msg)
        if problem is not None:
            self._drop(route, frame, "invalid", f"{type(msg).__name__} {msg.prompt_id[:80]!r}: {problem}")
            return
        if msg.seq < state.next_seq:
            state.duplicates += 1
            return
        if msg.seq >= state.granted:
            self._drop(route, frame, "over_credit", f"seq {msg.seq} of producer {state.producer!r}, at or past its "
                                                    f"credit limit {state.granted}")
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

    def _credit(self, state: ProducerStats, limit: int) -> Credit:
        return Credit(producer=state.producer, credits=max(0, limit - state.next_seq), next_seq=state.next_seq,
                      consumer_version=0 if self._weights is None else self._weights.version,
                      window=self._credits, max_message_bytes=self._max_message_bytes)

    def _send_credit(self, state: ProducerStats) -> None:
        state.pending_acks = 0
        self._unacked.discard(state.producer)
        if not state.route:
            return
        state.granted = state.consumed + self._credits
        self._sock.send_multipart([state.route, encode(self._credit(state, limit=state.granted))])

    def _flush_acks(self) -> None:
        # Only producers that have used up their credit wait for it; the others still have messages on
        # the way that will be consumed and acked. Each Credit wakes libzmq's I/O threads on both sides,
        # and on 2 busy cores an ack per wait cost ~40% of the throughput.
        for name in list(self._unacked):
            state = self._producers[name]
            if state.next_seq >= state.granted:
                self._send_credit(state)
